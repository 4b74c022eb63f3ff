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
    run_id: str | None

    def max_logged_step(self, key: str) -> int: ...

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

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def max_logged_step(self, key: str) -> int:
        return 0

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

    def max_logged_step(self, key: str) -> int:
        """Return the largest step logged for metric `key` in this run, 0 when none."""
        return max((metric.step for metric in self.client.get_metric_history(self.run_id, key)), default=0)

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
                params: dict[str, Any], resume_run_id: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run (or a NullTracker); mark it FAILED, or KILLED on an interrupt, if the body raises.

    With `resume_run_id`, the run of an earlier, interrupted attempt is reopened instead
    of creating a new one, when the store still has it in this experiment. Inside a DVC
    experiment the run is nested under the experiment's parent run, which also gets
    `params` and follows the run's status: RUNNING while a stage runs, then FINISHED,
    FAILED or KILLED.
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
    run_id = _reopen_run(client, resume_run_id, experiment_id, all_tags, params) if resume_run_id else None
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        _log_params(client, run_id, params)
    logger.info("MLflow run %s (%s) in %s", run_id, run_name, tracking_uri(root))
    ended = [run_id] if parent_id is None else [run_id, parent_id]
    try:
        yield MlflowTracker(client, run_id, parent_id)
    except KeyboardInterrupt:
        for finished in ended:
            _end_with_reason(client, finished, "KILLED", "interrupted by SIGINT or SIGTERM")
        raise
    except BaseException as error:
        for finished in ended:
            _end_with_reason(client, finished, "FAILED", f"{type(error).__name__}: {error}")
        raise
    for finished in ended:
        client.set_terminated(finished, status="FINISHED")


def _reopen_run(client: Any, run_id: str, experiment_id: str, tags: dict[str, str],
                params: dict[str, Any]) -> str | None:
    """Set run `run_id` back to RUNNING and return its id; None when the store lacks it.

    MLflow rejects a param logged again with another value, so only params the run lacks
    are logged. A changed value stays as first logged, with a warning.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        logger.warning("MLflow run %s of the interrupted attempt is not in the store; starting a new run", run_id)
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        logger.warning("MLflow run %s is deleted or in another experiment; starting a new run", run_id)
        return None
    client.update_run(run_id, status="RUNNING")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_tag(run_id, "resumed", "true")
    logged = run.data.params
    for key in sorted(key for key in params if key in logged and logged[key] != str(params[key])):
        logger.warning("param %s was %s in MLflow run %s and is %s now; MLflow keeps the first value",
                       key, logged[key], run_id, params[key])
    _log_params(client, run_id, {key: value for key, value in params.items() if key not in logged})
    return run_id


def _end_with_reason(client: Any, run_id: str, status: str, reason: str) -> None:
    """Record why the run ended in the tag `failure.reason`, then terminate it with `status`."""
    client.set_tag(run_id, "failure.reason", reason[:5000])  # MLflow caps tag values at 8000 characters.
    client.set_terminated(run_id, status=status)
