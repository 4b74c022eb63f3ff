"""MLflow tracking against a real SQLite store anchored on DVC_ROOT."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import project_root, tracked_run, tracking_uri


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    project = tmp_path / "repo"
    project.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-exp")
    monkeypatch.chdir(elsewhere)
    return project


def test_store_follows_dvc_root_not_cwd(root):
    with tracked_run(True, "unit", "train_samba", {"model.kind": "samba"}, {"loss.pruning_weight": 0.1}) as tracker:
        tracker.log_metrics({"loss_main": 2.5}, step=10)
    assert (root / "mlflow.db").is_file()
    assert not (Path.cwd() / "mlflow.db").exists()
    assert project_root() == root.resolve()


def test_run_has_tags_params_and_steps(root):
    with tracked_run(True, "unit", "train_samba", {"model.kind": "samba"}, {"loss.pruning_weight": 0.1}) as tracker:
        for step in (5, 10):
            tracker.log_metrics({"loss_main": 3.0 / step}, step=step)
    client = MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name("unit")
    assert experiment.artifact_location == (root / "mlruns").resolve().as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model.kind"] == "samba"
    assert run.data.tags["dvc.experiment"] == "tidy-exp"
    assert "git.commit" in run.data.tags
    assert run.data.params["loss.pruning_weight"] == "0.1"
    history = client.get_metric_history(run.info.run_id, "loss_main")
    assert [(m.step, m.value) for m in history] == [(5, 0.6), (10, 0.3)]


def test_exception_marks_run_failed(root):
    with pytest.raises(RuntimeError, match="diverged"):
        with tracked_run(True, "unit", "train_baseline", {}, {}):
            raise RuntimeError("diverged")
    client = MlflowClient(tracking_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert run.info.status == "FAILED"


def test_disabled_tracking_writes_nothing(root):
    with tracked_run(False, "unit", "train_baseline", {}, {}) as tracker:
        tracker.log_metrics({"loss_main": 1.0}, step=1)
    assert not (root / "mlflow.db").exists()
