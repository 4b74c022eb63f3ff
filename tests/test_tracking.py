"""MLflow tracking against a real SQLite store anchored on DVC_ROOT: grouping, locking, safety checks."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import StageError
from pipeline.tracking import (
    EXPERIMENT_ROLE,
    PARENT_TAG,
    ROLE_TAG,
    STAGE_ROLE,
    inside_temp_workspace,
    open_store,
    project_root,
    store_lock,
    tracked_run,
    tracking_uri,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """Return an empty, migrated store file; creating one takes seconds, copying it does not."""
    folder = tmp_path_factory.mktemp("store")
    open_store(folder)
    return folder / "mlflow.db"


@pytest.fixture
def root(tmp_path, monkeypatch, migrated_store) -> Path:
    project = tmp_path / "repo"
    project.mkdir()
    shutil.copy2(migrated_store, project / "mlflow.db")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-exp")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    monkeypatch.chdir(elsewhere)
    return project


def runs_by_role(client: MlflowClient, experiment: str, role: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{role}'")


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
    (run,) = runs_by_role(client, "unit", STAGE_ROLE)
    assert run.info.status == "FINISHED"
    assert run.data.tags["model.kind"] == "samba"
    assert run.data.tags["dvc.experiment"] == "tidy-exp"
    assert run.data.tags["git.commit"] == "a" * 40
    assert run.data.params["loss.pruning_weight"] == "0.1"
    history = client.get_metric_history(run.info.run_id, "loss_main")
    assert [(m.step, m.value) for m in history] == [(5, 0.6), (10, 0.3)]


def test_stage_runs_nest_under_experiment_parent(root):
    with tracked_run(True, "unit", "train_samba", {"stage": "train_samba"},
                     {"loss.readout_weight": 0.5, "loss.pruning_weight": 0.1}):
        pass
    with tracked_run(True, "unit", "evaluate_samba", {"stage": "evaluate"},
                     {"loss.pruning_weight": 0.1, "eval.seq_len": 32}) as tracker:
        tracker.log_metrics({"test.ppl_token": 120.0})
        tracker.log_experiment_metrics({"samba.test.ppl_token": 120.0})
    client = MlflowClient(tracking_uri(root))
    (parent,) = runs_by_role(client, "unit", EXPERIMENT_ROLE)
    children = runs_by_role(client, "unit", STAGE_ROLE)
    assert parent.info.run_name == "tidy-exp"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dvc.experiment"] == "tidy-exp"
    assert parent.data.tags["git.commit"] == "a" * 40
    assert parent.data.params == {"loss.readout_weight": "0.5", "loss.pruning_weight": "0.1", "eval.seq_len": "32"}
    assert parent.data.metrics == {"samba.test.ppl_token": 120.0}
    assert sorted(run.info.run_name for run in children) == ["evaluate_samba", "train_samba"]
    for child in children:
        assert child.data.tags[PARENT_TAG] == parent.info.run_id
        assert "samba.test.ppl_token" not in child.data.metrics


def test_rerun_with_other_params_gets_new_parent(root):
    for weight in (0.1, 0.1, 0.3):
        with tracked_run(True, "unit", "train_samba", {}, {"loss.pruning_weight": weight}):
            pass
    client = MlflowClient(tracking_uri(root))
    parents = runs_by_role(client, "unit", EXPERIMENT_ROLE)
    assert sorted(run.data.params["loss.pruning_weight"] for run in parents) == ["0.1", "0.3"]
    assert {run.info.run_name for run in parents} == {"tidy-exp"}


def test_exception_marks_run_and_parent_failed(root):
    with pytest.raises(RuntimeError, match="diverged"):
        with tracked_run(True, "unit", "train_baseline", {}, {}):
            raise RuntimeError("diverged")
    client = MlflowClient(tracking_uri(root))
    (run,) = runs_by_role(client, "unit", STAGE_ROLE)
    (parent,) = runs_by_role(client, "unit", EXPERIMENT_ROLE)
    assert run.info.status == "FAILED"
    assert parent.info.status == "FAILED"


def test_workspace_run_has_no_parent(root, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME")
    with tracked_run(True, "unit", "train_baseline", {}, {"train.steps": 3}) as tracker:
        tracker.log_experiment_metrics({"samba.test.ppl_token": 1.0})
    client = MlflowClient(tracking_uri(root))
    (run,) = runs_by_role(client, "unit", STAGE_ROLE)
    assert run.data.tags["dvc.experiment"] == "workspace"
    assert PARENT_TAG not in run.data.tags
    assert run.data.metrics == {}
    assert runs_by_role(client, "unit", EXPERIMENT_ROLE) == []


def test_disabled_tracking_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with tracked_run(False, "unit", "train_baseline", {}, {}) as tracker:
        tracker.log_metrics({"loss_main": 1.0}, step=1)
        tracker.log_experiment_metrics({"loss_main": 1.0})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("location", "expected"), [
    ("/repo/.dvc/tmp/exps/tmpab12/mlruns", True),
    ("file:///repo/.dvc/tmp/exps/standalone/tmpx/mlruns/0", True),
    ("/repo/mlruns", False),
    ("file:///repo/.dvc/tmp/mlruns", False),
    ("s3://bucket/.dvc/tmp/exps/x", False),
])
def test_inside_temp_workspace(location, expected):
    assert inside_temp_workspace(location) is expected


def test_store_inside_temp_workspace_rejected(root, monkeypatch):
    temp = root / ".dvc" / "tmp" / "exps" / "tmp123"
    temp.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(temp))
    with pytest.raises(StageError, match="inside a temporary DVC workspace"):
        with tracked_run(True, "unit", "train_baseline", {}, {}):
            pass
    assert not (temp / "mlflow.db").exists()


def test_experiment_with_temp_artifacts_rejected(root):
    client = open_store(root)
    temp = root / ".dvc" / "tmp" / "exps" / "tmp123" / "mlruns"
    client.create_experiment("unit", artifact_location=temp.as_uri())
    with pytest.raises(StageError, match="set tracking.experiment to a new name"):
        with tracked_run(True, "unit", "train_baseline", {}, {}):
            pass


def test_deleted_experiment_rejected(root):
    client = open_store(root)
    client.delete_experiment(client.create_experiment("unit"))
    with pytest.raises(StageError, match="mlflow experiments restore"):
        with tracked_run(True, "unit", "train_baseline", {}, {}):
            pass


def test_store_lock_times_out(root):
    with store_lock(root):
        with pytest.raises(StageError, match="timed out"):
            with store_lock(root, timeout_s=0.2):
                pass


def _start_run_at_barrier(root: str, barrier, results) -> None:
    """Open one tracked run once every process has reached the barrier (runs in a child process)."""
    sys.path.insert(0, str(REPO_ROOT))
    os.environ["DVC_ROOT"] = root
    os.environ["DVC_EXP_NAME"] = f"exp-{os.getpid()}"
    os.environ["DVC_EXP_BASELINE_REV"] = "b" * 40
    from pipeline.tracking import tracked_run as run_in_child

    barrier.wait(timeout=120)
    try:
        with run_in_child(True, "race", "train_samba", {}, {"loss.pruning_weight": 0.1}) as tracker:
            tracker.log_metrics({"loss_main": 1.0}, step=1)
        results.put("ok")
    except Exception as error:  # noqa: BLE001 - the parent test reports every failure
        results.put(f"{type(error).__name__}: {error}")


@pytest.mark.slow
def test_first_store_creation_by_concurrent_processes(tmp_path):
    # Without the store lock, four processes migrating a fresh SQLite store at once fail
    # (mlflow 3.17: "table ... already exists", "Online migration expected to match one row").
    workers = 4
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_start_run_at_barrier, args=(str(tmp_path), barrier, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["ok"] * workers
    client = MlflowClient(tracking_uri(tmp_path))
    assert [e.name for e in client.search_experiments()].count("race") == 1
    assert len(runs_by_role(client, "race", STAGE_ROLE)) == workers
    assert len(runs_by_role(client, "race", EXPERIMENT_ROLE)) == workers
    # MLflow's own "Default" experiment keeps its artifacts under the root too, not in a cwd.
    default = client.get_experiment("0")
    assert default.artifact_location.startswith((tmp_path / "mlruns").resolve().as_uri())
