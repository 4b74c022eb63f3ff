"""Checks that keep a stage's DVC record true: inputs tracked by git or DVC, params unchanged.

`dvc exp run --temp` and queued experiments run in a temporary copy of the repository that
contains only what git or DVC tracks. A stage input that neither tracks is missing there, or is
read from the parent repository's unversioned copy. And DVC writes a stage's
params into dvc.lock after the stage ends, reading params.yaml again at that moment, so an
edit made while the stage ran would be recorded for outputs that never used it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from pipeline.errors import StageError
from pipeline.params import Params, ParamsError, load_params, read_yaml
from pipeline.tracking import project_root

logger = logging.getLogger(__name__)


def workspace_root() -> Path:
    """Return the copy of the repository the stage runs in: the nearest folder with dvc.yaml above the cwd.

    DVC runs each stage in its `wdir`, the folder of dvc.yaml, so for a queued or `--temp` run this
    is the temporary workspace, whereas `project_root()` (DVC_ROOT) is the parent repository.
    """
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def _git_tracked(repo: Path, relative: list[Path]) -> set[str] | None:
    """Return which of `relative` git tracks in repo, or None if repo is not in a git work tree."""
    try:
        result = subprocess.run(["git", "ls-files", "-z", "--", *(path.as_posix() for path in relative)],
                                cwd=repo, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return set(filter(None, result.stdout.split("\0")))


def _dvc_outs(repo: Path) -> list[Path]:
    """Return every path DVC tracks in repo (`.dvc` files and stage outs), relative to repo."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc_repo:
            return [Path(out.fs_path).relative_to(repo) for out in dvc_repo.index.outs]
    except (DvcException, ValueError) as error:
        logger.warning("cannot list DVC-tracked paths in %s (%s); treating none as tracked", repo, error)
        return []


def untracked_files(repo: Path, files: list[Path]) -> list[Path]:
    """Return the files, all inside repo, that neither git nor DVC tracks; [] outside a git repository."""
    relative = [file.resolve().relative_to(repo) for file in files]
    in_git = _git_tracked(repo, relative)
    if in_git is None:
        return []
    remaining = [path for path in relative if path.as_posix() not in in_git]
    if not remaining:
        return []
    outs = _dvc_outs(repo)
    return [repo / path for path in remaining if not any(out == path or out in path.parents for out in outs)]


def _repository_of(path: Path) -> Path | None:
    for repo in dict.fromkeys((workspace_root(), project_root())):
        if path == repo or repo in path.parents:
            return repo
    return None


def check_tracked_inputs(files: list[Path], param: str) -> None:
    """Raise StageError if an input inside the repository is neither in git nor tracked by DVC.

    A file outside the repository is left alone: every workspace reads the same absolute path.
    """
    resolved = [file.resolve() for file in files]
    repo = next((found for found in map(_repository_of, resolved) if found is not None), None)
    if repo is None:
        return
    inside = [file for file in resolved if _repository_of(file) == repo]
    missing = untracked_files(repo, inside)
    parent_copies = [project_root() / file.relative_to(repo) for file in missing]
    if not any(path.exists() for path in (*missing, *parent_copies)):
        return  # a wrong path, not an untracked one: the loader reports it as not found
    first = missing[0].relative_to(repo)
    folder = first.parent.as_posix() if first.parent != Path(".") else first.as_posix()
    raise StageError(
        f"{param}: {first.as_posix()} is neither in git nor tracked by DVC, and `dvc exp run --temp` "
        f"and queued experiments see only tracked files: track it with `dvc add {folder}` and "
        f"`git add {folder}.dvc`, or with `git add {first.as_posix()}`, then commit"
    )


def stage_param_keys(stage: str, dvc_yaml: Path) -> list[str] | None:
    """Return the params.yaml keys that dvc.yaml lists for `stage`, or None if they cannot be read."""
    try:
        stages = read_yaml(dvc_yaml).get("stages", {})
    except (OSError, AttributeError, ValueError):
        return None
    entry = stages.get(stage) if isinstance(stages, dict) else None
    if not isinstance(entry, dict):
        return None
    keys: list[str] = []
    for item in entry.get("params", []):
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, dict):
            # `- params.yaml: [key, ...]` names the default file explicitly; other files are not ours.
            keys.extend(key for key in item.get("params.yaml", []) or [])
    return keys


def _selected(flat: dict, keys: list[str] | None) -> dict:
    if keys is None:
        return flat
    return {key: value for key, value in flat.items()
            if any(key == wanted or key.startswith(wanted + ".") for wanted in keys)}


def check_params_unchanged(params_path: Path, used: Params) -> None:
    """Raise StageError if params.yaml no longer contains the values this DVC stage ran with.

    Runs only under DVC (which sets DVC_STAGE), and compares the keys that dvc.yaml lists for the
    stage, the ones dvc.lock records; all keys when dvc.yaml cannot be read.
    """
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return
    keys = stage_param_keys(stage, workspace_root() / "dvc.yaml")
    try:
        now = _selected(load_params(params_path).flat(), keys)
    except ParamsError as error:
        raise StageError(f"{params_path} changed while stage {stage!r} ran and is now invalid ({error}): "
                         "fix it and rerun the stage") from None
    before = _selected(used.flat(), keys)
    changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
               for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]
    if changed:
        raise StageError(
            f"{params_path} changed while stage {stage!r} ran ({'; '.join(changed)}): its outputs used the "
            "old values, so DVC must not record the new ones; rerun the stage"
        )
