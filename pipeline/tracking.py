"""MLflow tracking anchored on the repository root, and a no-op tracker.

The store is one SQLite file, `<root>/mlflow.db`, with artifacts under `<root>/mlruns`.
The root comes from `DVC_ROOT`, which DVC sets for every stage and, for `dvc exp run --temp`
and queued runs, points at the parent repository (dvc 3.67, dvc/repo/experiments/queue/base.py),
so those runs land in the same store instead of a temporary workspace that DVC deletes.

Runs of one DVC experiment are grouped: each stage's run is nested (tag `mlflow.parentRunId`)
under a parent run named after the experiment (`DVC_EXP_NAME`). The parent carries the params
of every stage and the summary metrics that `evaluate` logs, so one row per experiment in the
MLflow UI compares a sweep. Runs outside an experiment (`dvc repro`, a bare `samba` command)
have no parent.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from pipeline.errors import StageError

logger = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
LOCK_FILE = "mlflow.db.lock"
ARTIFACT_DIR = "mlruns"
LOCK_TIMEOUT_S = 300.0

# Tag values of `samba.role`: a parent run per DVC experiment, a child run per stage.
ROLE_TAG = "samba.role"
EXPERIMENT_ROLE = "experiment"
STAGE_ROLE = "stage"
PARENT_TAG = "mlflow.parentRunId"

_TEMP_WORKSPACE_PARTS = (".dvc", "tmp", "exps")


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def log_experiment_metrics(self, metrics: dict[str, float]) -> None: ...


def project_root() -> Path:
    """Return DVC_ROOT when DVC runs the stage, else the nearest folder above the cwd with dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / STORE_FILE).resolve()}"


def artifact_root_uri(root: Path) -> str:
    return (root / ARTIFACT_DIR).resolve().as_uri()


def inside_temp_workspace(location: str | Path) -> bool:
    """Tell whether a path or file URI lies in a DVC temporary workspace (`.dvc/tmp/exps/...`)."""
    text = str(location)
    if "://" in text:
        parsed = urlparse(text)
        if parsed.scheme != "file":
            return False
        text = unquote(parsed.path)
    parts = Path(text).parts
    width = len(_TEMP_WORKSPACE_PARTS)
    return any(parts[i:i + width] == _TEMP_WORKSPACE_PARTS for i in range(len(parts) - width + 1))


def git_commit(root: Path) -> str:
    """Return the commit the run starts from: DVC's experiment baseline, else HEAD."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip()


@contextmanager
def store_lock(root: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive `flock` on `<root>/mlflow.db.lock`, shared by every process on this machine.

    Creating an SQLite store runs schema migrations that fail when two processes run them at
    once (seen with mlflow 3.17: "table ... already exists"), and finding or creating an
    experiment or a parent run is check-then-create; all of these run under this lock.
    """
    # NOTE: flock is advisory and local: it does not guard a store on a network file system
    # shared by several machines.
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(root / LOCK_FILE, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise StageError(f"timed out after {timeout_s:.0f} s waiting for the MLflow store lock "
                                     f"{root / LOCK_FILE}: check for a hung samba process") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_store_root(root: Path) -> None:
    if inside_temp_workspace(root):
        raise StageError(
            f"the MLflow store root {root} is inside a temporary DVC workspace, which DVC deletes after "
            "the run: run the stage through `dvc exp run` (it sets DVC_ROOT to the repository) or set "
            "DVC_ROOT to the repository root"
        )


def _create_store(root: Path) -> None:
    """Create and migrate the SQLite store if needed; call only under `store_lock`.

    Constructing the store directly, with the artifact root under the repository, also gives
    MLflow's "Default" experiment that location. Through `MlflowClient` it would be `./mlruns`
    in the working directory, which for a queued run is a temporary workspace.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(tracking_uri(root), artifact_root_uri(root))


def _experiment_id(client: Any, name: str, root: Path) -> str:
    """Find or create the experiment; call only under `store_lock`."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_root_uri(root))
    if experiment.lifecycle_stage != "active":
        raise StageError(
            f"MLflow experiment {name!r} is deleted: restore it with `mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}` or set tracking.experiment to another name"
        )
    if inside_temp_workspace(experiment.artifact_location):
        raise StageError(
            f"MLflow experiment {name!r} stores artifacts in {experiment.artifact_location}, inside a "
            "temporary DVC workspace that DVC deletes: set tracking.experiment to a new name"
        )
    return experiment.experiment_id


def _params_agree(logged: dict[str, str], params: dict[str, Any]) -> bool:
    return all(logged[key] == str(value) for key, value in params.items() if key in logged)


def _experiment_parent(client: Any, experiment_id: str, dvc_experiment: str, commit: str,
                       params: dict[str, Any]) -> str:
    """Find or create the parent run of a DVC experiment; call only under `store_lock`.

    A parent matches on experiment name, baseline commit and every param both have in common,
    so rerunning an experiment joins its parent, while `dvc exp run -f -n NAME` with other
    values starts a new one instead of failing MLflow's rule that params never change.
    """
    candidates = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = '{EXPERIMENT_ROLE}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in candidates:
        tags = run.data.tags
        if (tags.get("dvc.experiment") == dvc_experiment and tags.get("git.commit") == commit
                and _params_agree(run.data.params, params)):
            return run.info.run_id
    tags = {"dvc.experiment": dvc_experiment, "git.commit": commit, ROLE_TAG: EXPERIMENT_ROLE}
    return client.create_run(experiment_id, run_name=dvc_experiment, tags=tags).info.run_id


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def _metric_batch(metrics: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    return [Metric(key, float(value), now, step) for key, value in metrics.items()]


class NullTracker:
    """A tracker that records nothing, for `tracking.enabled: false`."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def log_experiment_metrics(self, metrics: dict[str, float]) -> None:
        pass


class MlflowTracker:
    """One MLflow run; metrics are logged in batches with explicit steps."""

    def __init__(self, client: Any, run_id: str, parent_id: str | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.client.log_batch(self.run_id, metrics=_metric_batch(metrics, step or 0))

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_experiment_metrics(self, metrics: dict[str, float]) -> None:
        """Log summary metrics on the DVC experiment's parent run; outside an experiment, do nothing."""
        if self.parent_id is not None:
            self.client.log_batch(self.parent_id, metrics=_metric_batch(metrics, 0))


def open_store(root: Path) -> Any:
    """Create the store at `root` once, safely across processes, and return an MlflowClient for it."""
    from mlflow.tracking import MlflowClient

    _check_store_root(root)
    with store_lock(root):
        _create_store(root)
    return MlflowClient(tracking_uri=tracking_uri(root))


@contextmanager
def tracked_run(enabled: bool, experiment: str, run_name: str, tags: dict[str, str],
                params: dict[str, Any]) -> Iterator[Tracker]:
    """Open an MLflow run (or a NullTracker); mark it FAILED if the body raises.

    Inside a DVC experiment the run is nested under the experiment's parent run, which also gets
    `params` and follows the run's status: RUNNING while a stage runs, then FINISHED or FAILED.
    """
    if not enabled:
        yield NullTracker()
        return
    root = project_root()
    client = open_store(root)
    dvc_experiment = os.environ.get("DVC_EXP_NAME")
    commit = git_commit(root)
    with store_lock(root):
        experiment_id = _experiment_id(client, experiment, root)
        parent_id = None
        if dvc_experiment:
            parent_id = _experiment_parent(client, experiment_id, dvc_experiment, commit, params)
    all_tags = {
        "dvc.experiment": dvc_experiment or "workspace",
        "git.commit": commit,
        ROLE_TAG: STAGE_ROLE,
        **tags,
    }
    if parent_id is not None:
        all_tags[PARENT_TAG] = parent_id
        client.update_run(parent_id, status="RUNNING")
        _log_params(client, parent_id, params)
    run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    _log_params(client, run_id, params)
    logger.info("MLflow run %s (%s) in %s", run_id, run_name, tracking_uri(root))
    try:
        yield MlflowTracker(client, run_id, parent_id)
    except BaseException:
        for finished in (run_id, parent_id):
            if finished is not None:
                client.set_terminated(finished, status="FAILED")
        raise
    for finished in (run_id, parent_id):
        if finished is not None:
            client.set_terminated(finished, status="FINISHED")
