"""The folder of an interrupted training run's state, so the same command picks it up again.

The folder is `<root>/.samba/resume/train_<kind>-<key>`, plus `-<name>` inside a DVC
experiment named <name>, with <root> the project root
(DVC_ROOT when DVC runs the stage) and <key> a hash of everything that shapes the
result: the stage's params, the token files and the training code. Three reasons for this
place rather than a DVC output:

- DVC deletes a stage's outputs before it runs the stage, so state kept under
  models/<kind> would be gone exactly when `dvc repro` reruns the interrupted stage;
- `dvc exp run --temp` and queued runs work in a temporary copy of the repository that
  DVC deletes, while DVC_ROOT points at the parent repository, so their state outlives them;
- a changed config, corpus or training code gives another key, so it never resumes a
  stale run, whereas an unchanged one resumes whichever command (`samba train`,
  `dvc repro`, `dvc exp run`) started it.

The folder is git-ignored and removed once the run has finished. A lock file keeps two
processes from training into the same folder at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import samba
from pipeline.errors import StageError
from samba.train.checkpoint import CheckpointError, write_atomically
from samba.train.train_state import STATE_FILE, read_state_extra

logger = logging.getLogger(__name__)

RESUME_DIR = Path(".samba") / "resume"
RUN_FILE = "mlflow_run.json"
LOCK_FILE = "lock"
KEY_FIELD = "resume_key"  # The key is saved in the state too, for folders chosen with --checkpoint-dir.
# The training code, as dvc.yaml lists it for the train stages (relative to the samba package).
TRAINING_CODE = ("model", "train", "data/stream.py", "loss.py", "sparsity")
# Params that change how a run is carried out but not its result.
NOT_IN_KEY = ("train.checkpoint_every",)


def resume_key(kind: str, stage_params: dict, tokens_dir: Path) -> str:
    """Hash the model kind, the stage's params, the token files and the training code."""
    digest = hashlib.sha256()
    params = {key: value for key, value in stage_params.items() if key not in NOT_IN_KEY}
    digest.update(json.dumps({"kind": kind, "params": params}, sort_keys=True).encode("utf-8"))
    for path in sorted(tokens_dir.iterdir()):
        if path.is_file():
            digest.update(path.name.encode("utf-8"))
            _update_with_file(digest, path)
    package = Path(samba.__file__).resolve().parent
    for entry in TRAINING_CODE:
        # Every file, not only *.py, so compiled-kernel sources count too; bytecode caches do not.
        files = (sorted(path for path in (package / entry).rglob("*")
                        if path.is_file() and "__pycache__" not in path.parts)
                 if (package / entry).is_dir() else [package / entry])
        for path in files:
            digest.update(path.relative_to(package).as_posix().encode("utf-8"))
            _update_with_file(digest, path)
    return digest.hexdigest()[:16]


def default_resume_folder(root: Path, kind: str, key: str) -> Path:
    """Return the state folder for this config, one per DVC experiment name.

    Queued experiments of a sweep often train the same baseline at the same time under
    one DVC_ROOT; a folder per experiment keeps them from contending for one lock.
    """
    experiment = os.environ.get("DVC_EXP_NAME")
    suffix = f"-{experiment}" if experiment else ""
    return root / RESUME_DIR / f"train_{kind}-{key}{suffix}"


@contextmanager
def locked_folder(folder: Path) -> Iterator[Path]:
    """Create `folder` and hold its lock; raise StageError when another process holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / LOCK_FILE).open("a+", encoding="utf-8")
    except OSError as error:
        raise StageError(f"cannot create the training-state folder {folder}: {error.strerror} "
                         "(pass a writable folder with --checkpoint-dir)") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise StageError(f"another training process (pid {owner}) is using {folder}: wait for it to finish, "
                             "or stop it and rerun this command to resume") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield folder
    finally:
        handle.close()  # Closing releases the lock; the kernel also releases it when the process dies.


def read_run_id(folder: Path) -> str | None:
    """Return the MLflow run id that an earlier attempt of this run recorded, if any."""
    path = folder / RUN_FILE
    try:
        run_id = json.loads(path.read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def write_run_id(folder: Path, run_id: str) -> None:
    text = json.dumps({"run_id": run_id}) + "\n"
    write_atomically(folder / RUN_FILE, lambda name: Path(name).write_text(text, encoding="utf-8"))


def check_state_key(folder: Path, key: str) -> None:
    """Raise StageError when the saved state in `folder` belongs to another config, data or code."""
    path = folder / STATE_FILE
    if not path.is_file():
        return
    try:
        saved = read_state_extra(path).get(KEY_FIELD)
    except CheckpointError as error:
        raise StageError(f"{error}, or pass --no-resume") from None
    if saved != key:
        raise StageError(f"the training state in {folder} comes from other params, tokens or training code "
                         f"(key {saved}, this run {key}): pass --no-resume to discard it, or choose another "
                         "--checkpoint-dir")


def discard_state(folder: Path) -> None:
    """Delete the saved training state and run id, so the next attempt starts from step 0 in a new MLflow run."""
    for name in (STATE_FILE, RUN_FILE):
        (folder / name).unlink(missing_ok=True)


def remove_folder(folder: Path) -> None:
    """Remove the lock file and the folder once the run has finished, unless something else is in it."""
    (folder / LOCK_FILE).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        logger.info("kept %s because it contains other files", folder)


def _update_with_file(digest: Any, path: Path) -> None:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
