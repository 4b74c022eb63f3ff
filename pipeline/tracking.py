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

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

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
                params: dict[str, Any]) -> Iterator[Tracker]:
    """Open an MLflow run (or a NullTracker); mark it FAILED if the body raises."""
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
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])
    logger.info("MLflow run %s (%s) in %s", run_id, run_name, tracking_uri(root))
    try:
        yield MlflowTracker(client, run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
