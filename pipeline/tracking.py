"""MLflow tracking anchored on the repository root, and a no-op tracker.

The store is one SQLite file, `<root>/mlflow.db`, with artifacts under `<root>/mlruns`.
The root comes from `DVC_ROOT`, which DVC sets for every stage and points at the
parent repository also for `dvc exp run --temp` and queued runs, so those runs land
in the same store instead of a temporary workspace that DVC deletes.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlruns"


class Tracker(Protocol):
    run_id: str | None

    def max_logged_step(self, key: str) -> int: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path) -> None: ...


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


class NullTracker:
    """A tracker that records nothing, for `tracking.enabled: false`."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def max_logged_step(self, key: str) -> int:
        return 0

    def log_artifact(self, path: Path) -> None:
        pass


class MlflowTracker:
    """One MLflow run; metrics are logged in batches with explicit steps."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def max_logged_step(self, key: str) -> int:
        """Return the largest step logged for metric `key` in this run, 0 when none."""
        return max((metric.step for metric in self.client.get_metric_history(self.run_id, key)), default=0)


def _experiment_id(client: Any, name: str, root: Path) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(root / ARTIFACT_DIR).resolve().as_uri())
    except MlflowException:
        # Another stage created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextmanager
def tracked_run(enabled: bool, experiment: str, run_name: str, tags: dict[str, str],
                params: dict[str, Any], resume_run_id: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run (or a NullTracker); mark it FAILED, or KILLED on an interrupt, if the body raises.

    With `resume_run_id`, the run of an earlier, interrupted attempt is reopened instead
    of creating a new one, when the store still has it in this experiment.
    """
    if not enabled:
        yield NullTracker()
        return
    from mlflow.tracking import MlflowClient

    root = project_root()
    client = MlflowClient(tracking_uri=tracking_uri(root))
    experiment_id = _experiment_id(client, experiment, root)
    all_tags = {
        "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "git.commit": git_commit(root),
        **tags,
    }
    run_id = _reopen_run(client, resume_run_id, experiment_id, all_tags, params) if resume_run_id else None
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        _log_params(client, run_id, params)
    logger.info("MLflow run %s (%s) in %s", run_id, run_name, tracking_uri(root))
    try:
        yield MlflowTracker(client, run_id)
    except KeyboardInterrupt:
        _end_with_reason(client, run_id, "KILLED", "interrupted by SIGINT or SIGTERM")
        raise
    except BaseException as error:
        _end_with_reason(client, run_id, "FAILED", f"{type(error).__name__}: {error}")
        raise
    client.set_terminated(run_id, status="FINISHED")


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


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
