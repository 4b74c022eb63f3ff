"""Failed runs: divergence stops training with a clear line, keeps the last good state, marks MLflow FAILED."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import run
from pipeline.cli import app
from pipeline.tracking import tracked_run, tracking_uri
from train_workspace import make_workspace, start, state_files, train_command

runner = CliRunner()

# A learning rate that makes the tiny baseline's loss NaN at step 10, while the warmup
# still ramps it up (50 at step 10), so the states saved every 2 steps end at step 8.
DIVERGING = {"train": {"steps": 30, "lr": 100.0, "min_lr": 0.0, "warmup_steps": 20, "checkpoint_every": 2,
                       "log_every": 2}}


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, ptb_dir):
    """One diverging `samba train` run; return its workspace and CLI result."""
    workspace = make_workspace(tmp_path_factory.mktemp("diverged"), ptb_dir, **DIVERGING)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        patch.delenv("DVC_ROOT", raising=False)
        result = runner.invoke(app, train_command("baseline")[1:])
    return workspace, result


def train_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name("samba-tiny")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'train_baseline'",
                              order_by=["attributes.start_time ASC"])


def saved_step(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["samba"])["progress"]["step"]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_divergence_stops_with_one_line(diverged):
    _, result = diverged

    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert "non-finite loss at step 10" in line
    assert "loss_total nan" in line
    assert "loss_main nan" in line
    assert "(step 8)" in line
    assert "train.lr" in line
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_divergence_keeps_last_good_state(diverged):
    workspace, _ = diverged

    (state,) = state_files(workspace)
    assert saved_step(state) == 8
    assert not (workspace / "models" / "baseline" / "model.safetensors").exists()


def test_divergence_marks_run_failed(diverged):
    workspace, _ = diverged

    (failed,) = train_runs(workspace)
    assert failed.info.status == "FAILED"
    reason = failed.data.tags["failure.reason"]
    assert reason.startswith("NonFiniteLossError: non-finite loss at step 10: loss_total nan")


def test_rerun_resumes_then_no_resume_restarts(tmp_path, ptb_dir, monkeypatch, caplog):
    workspace = make_workspace(tmp_path / "ws", ptb_dir, **DIVERGING)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    runner.invoke(app, train_command("baseline")[1:])

    caplog.set_level(logging.INFO)
    rerun = runner.invoke(app, train_command("baseline")[1:])
    assert rerun.exit_code == 1
    assert "resuming from step 8 of 30" in caplog.text
    (reopened,) = train_runs(workspace)
    assert reopened.info.status == "FAILED"
    assert reopened.data.tags["resumed"] == "true"

    caplog.clear()
    runner.invoke(app, [*train_command("baseline")[1:], "--no-resume"])
    assert "resuming" not in caplog.text
    assert [r.info.status for r in train_runs(workspace)] == ["FAILED", "FAILED"]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def test_exception_records_reason(store):
    with pytest.raises(OSError, match="disk full"):
        with tracked_run(True, "unit", "train_samba", {}, {}):
            raise OSError("disk full")
    client = MlflowClient(tracking_uri(store))
    (failed,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure.reason"] == "OSError: disk full"


def test_interrupt_marks_run_killed(store):
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(True, "unit", "train_samba", {}, {}):
            raise KeyboardInterrupt
    client = MlflowClient(tracking_uri(store))
    (killed,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert killed.info.status == "KILLED"
    assert "SIGTERM" in killed.data.tags["failure.reason"]


def test_reopened_run_keeps_params(store):
    with tracked_run(True, "unit", "train_samba", {}, {"train.lr": 0.1, "train.checkpoint_every": 5}) as first:
        first.log_metrics({"loss_total": 2.0}, step=4)
    with tracked_run(True, "unit", "train_samba", {}, {"train.lr": 0.1, "train.checkpoint_every": 9,
                                                        "train.seed": 0}, resume_run_id=first.run_id) as second:
        assert second.run_id == first.run_id
        assert second.max_logged_step("loss_total") == 4
    client = MlflowClient(tracking_uri(store))
    run_data = client.get_run(first.run_id).data
    assert run_data.params == {"train.lr": "0.1", "train.checkpoint_every": "5", "train.seed": "0"}


@pytest.mark.slow
def test_sigterm_marks_killed_then_resumes(tmp_path, ptb_dir):
    workspace = make_workspace(tmp_path / "ws", ptb_dir,
                               train={"steps": 60, "checkpoint_every": 10, "log_every": 10})
    log = tmp_path / "first.log"
    process = start(train_command("baseline"), workspace, log)
    deadline = time.monotonic() + 300
    while not state_files(workspace) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=120) == 130, log.read_text()
    assert error_lines(log.read_text()) == [
        "error: training interrupted; rerun the same command to resume from the last training state"]
    (killed,) = train_runs(workspace)
    assert killed.info.status == "KILLED"
    assert state_files(workspace)

    rerun = run(train_command("baseline"), workspace)
    assert "resuming from step" in rerun.stderr
    (finished,) = train_runs(workspace)
    assert finished.info.run_id == killed.info.run_id
    assert finished.info.status == "FINISHED"


def diverging_overrides() -> list[str]:
    return [item for key, value in DIVERGING["train"].items() for item in ("-S", f"train.{key}={value}")]


@pytest.mark.slow
def test_failure_in_dvc_exp_temp_is_recorded(tiny_project):
    result = run(["dvc", "exp", "run", "--temp", "-n", "diverges", *diverging_overrides(), "train_baseline"],
                 tiny_project, check=False)

    assert result.returncode != 0
    assert "non-finite loss at step 10" in result.stdout + result.stderr
    (failed,) = train_runs(tiny_project)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["dvc.experiment"] == "diverges"
    assert failed.data.tags["failure.reason"].startswith("NonFiniteLossError: non-finite loss at step 10")
    # The state of the failed temporary run lies in the parent repository, ready for a rerun.
    (state,) = state_files(tiny_project)
    assert saved_step(state) == 8


@pytest.mark.slow
def test_failure_in_queued_run_is_recorded(tiny_project):
    run(["dvc", "exp", "run", "--queue", "-n", "queued-diverges", *diverging_overrides(), "train_baseline"],
        tiny_project)
    result = run(["dvc", "exp", "run", "--run-all"], tiny_project, check=False)

    (failed,) = train_runs(tiny_project)
    assert failed.info.status == "FAILED", result.stdout + result.stderr
    assert failed.data.tags["dvc.experiment"] == "queued-diverges"
    assert failed.data.tags["failure.reason"].startswith("NonFiniteLossError: non-finite loss at step 10")
