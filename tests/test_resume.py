"""Resuming training: the state file, atomic writes, the resume folder, and real kill -9 runs."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from conftest import run, write_params
from pipeline import resume
from pipeline.errors import StageError
from pipeline.params import load_params
from pipeline.stages.train import BASELINE_SECTIONS, stage_params
from pipeline.tracking import tracking_uri
from samba.data.stream import TrainStream
from samba.model import MambaConfig, ReadoutConfig, build_model
from samba.train.checkpoint import CheckpointError, write_atomically
from samba.train.optim import build_optimizer
from samba.train.train_state import STATE_FILE, TrainProgress, load_train_state, save_train_state
from samba.train.trainer import TrainConfig, seed_everything, train
from train_workspace import make_workspace, read_outputs, start, state_files, train_command

TINY = MambaConfig(vocab_size=40, d_model=16, n_layers=2, d_state=4)
READOUT = ReadoutConfig(hidden_size=8)
CONFIG = TrainConfig(steps=12, lr=3e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.1, grad_clip=1.0, log_every=3,
                     readout_weight=0.5, pruning_weight=0.1, checkpoint_every=4)


class Interrupted(Exception):
    pass


def fresh_samba() -> tuple[torch.nn.Module, TrainStream]:
    seed_everything(0)
    model = build_model("samba", TINY, READOUT)
    ids = torch.randint(0, TINY.vocab_size, (2000,), generator=torch.Generator().manual_seed(123))
    return model, TrainStream(ids, batch_size=4, seq_len=12)


def stop_at(step: int):
    def on_log(record):
        if record.step == step:
            raise Interrupted(f"stopped at step {step}")

    return on_log


def test_interrupted_run_resumes_bitwise(tmp_path):
    model, stream = fresh_samba()
    reference = train(model, stream, CONFIG)

    crashed, stream = fresh_samba()
    with pytest.raises(Interrupted):
        train(crashed, stream, CONFIG, on_log=stop_at(9), checkpoint_dir=tmp_path)
    resumed, stream = fresh_samba()
    summary = train(resumed, stream, CONFIG, checkpoint_dir=tmp_path)

    assert summary.resumed_from == 8
    for (name, expected), (_, actual) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(expected, actual), name
    assert summary.final == reference.final
    assert [(r.step, r.losses, r.lr, r.grad_norm) for r in summary.records] == \
        [(r.step, r.losses, r.lr, r.grad_norm) for r in reference.records]


def test_state_restores_optimizer_and_rng(tmp_path):
    model, stream = fresh_samba()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    inputs, _ = stream.batch(0)
    output = model(inputs)
    (output.logits.sum() + output.readout_logits.sum()).backward()
    optimizer.step()
    random.seed(7)
    progress = TrainProgress(step=1, seconds=0.5, interval_sums={"loss_total": 1.25}, interval_steps=1)
    save_train_state(tmp_path / STATE_FILE, model, optimizer, progress, extra={"resume_key": "abc"})
    expected_torch, expected_python = torch.rand(3), random.random()

    other, _ = fresh_samba()
    other_optimizer = build_optimizer(other, lr=1e-3, weight_decay=0.1)
    loaded, extra = load_train_state(tmp_path / STATE_FILE, other, other_optimizer)

    assert loaded == progress
    assert extra == {"resume_key": "abc"}
    assert torch.equal(torch.rand(3), expected_torch)
    assert random.random() == expected_python
    for param, other_param in zip(model.parameters(), other.parameters()):
        assert torch.equal(param, other_param)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[param][key], other_optimizer.state[other_param][key]), key


def test_state_file_is_safetensors_with_json(tmp_path):
    model, _ = fresh_samba()
    save_train_state(tmp_path / STATE_FILE, model, build_optimizer(model, lr=1e-3, weight_decay=0.0),
                     TrainProgress())
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as handle:
        document = json.loads(handle.metadata()["samba"])
        keys = set(handle.keys())
    assert document["format"] == "samba-train-state/1"
    assert "model.backbone.embedding.weight" in keys
    assert "rng.torch" in keys


def test_truncated_state_is_rejected(tmp_path):
    model, _ = fresh_samba()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    path = tmp_path / STATE_FILE
    save_train_state(path, model, optimizer, TrainProgress(step=3))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"truncated or corrupted.*delete {path}"):
        load_train_state(path, model, optimizer)


def test_state_of_other_shape_is_rejected(tmp_path):
    model, _ = fresh_samba()
    save_train_state(tmp_path / STATE_FILE, model, build_optimizer(model, lr=1e-3, weight_decay=0.0),
                     TrainProgress(step=3))
    seed_everything(0)
    wider = build_model("samba", MambaConfig(vocab_size=40, d_model=16, n_layers=2, d_state=8), READOUT)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_train_state(tmp_path / STATE_FILE, wider, build_optimizer(wider, lr=1e-3, weight_decay=0.0))


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"previous")

    def crash(name: str) -> None:
        Path(name).write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, crash)
    assert path.read_bytes() == b"previous"
    assert sorted(item.name for item in tmp_path.iterdir()) == ["state.bin"]


def test_resume_key_follows_params_not_checkpoint_every(tmp_path, ptb_dir):
    workspace = make_workspace(tmp_path / "ws", ptb_dir)
    params = load_params(workspace / "params.yaml")
    tokens = workspace / "data" / "tokens"
    flat = stage_params(params, BASELINE_SECTIONS)
    key = resume.resume_key("baseline", flat, tokens)

    assert resume.resume_key("baseline", {**flat, "train.checkpoint_every": 1}, tokens) == key
    assert resume.resume_key("baseline", {**flat, "train.lr": 0.1}, tokens) != key
    assert resume.resume_key("samba", flat, tokens) != key
    (tokens / "meta.json").write_text("{}", encoding="utf-8")
    assert resume.resume_key("baseline", flat, tokens) != key


def test_lock_rejects_second_process(tmp_path):
    with resume.locked_folder(tmp_path / "state"):
        with pytest.raises(StageError, match="another training process"):
            with resume.locked_folder(tmp_path / "state"):
                pass
    with resume.locked_folder(tmp_path / "state"):
        pass  # Released after the first holder left.


def kill_after_first_state(command: list[str], cwd: Path, log: Path) -> int:
    """Start `command`, SIGKILL its whole process group once a training state exists; return the saved step."""
    process = start(command, cwd, log)
    deadline = time.monotonic() + 300
    while not state_files(cwd) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it was killed:\n{log.read_text()}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (state,) = state_files(cwd)
    with safe_open(str(state), framework="pt") as handle:
        return json.loads(handle.metadata()["samba"])["progress"]["step"]


LONG_RUN = {"train": {"steps": 120, "checkpoint_every": 10, "log_every": 10}}


@pytest.mark.slow
def test_kill9_then_rerun_is_bitwise(tmp_path, ptb_dir):
    workspace = make_workspace(tmp_path / "ws", ptb_dir, **LONG_RUN)
    run(train_command("baseline", out="clean"), workspace)
    assert not state_files(workspace), "a finished run leaves no training state"

    saved_step = kill_after_first_state(train_command("baseline", out="killed"), workspace, tmp_path / "killed.log")
    assert 0 < saved_step < 120
    rerun = run(train_command("baseline", out="killed"), workspace)

    assert f"resuming from step {saved_step} of 120" in rerun.stderr
    clean, resumed = read_outputs(workspace / "clean", "baseline"), read_outputs(workspace / "killed", "baseline")
    assert resumed["weights"] == clean["weights"]
    assert resumed["metrics"] == clean["metrics"]
    assert resumed["curve"] == clean["curve"]

    client = MlflowClient(tracking_uri(workspace))
    experiment = client.get_experiment_by_name("samba-tiny")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # The clean run and the killed-then-resumed one.
    continued = runs[1]
    assert continued.info.status == "FINISHED"
    assert continued.data.tags["resumed"] == "true"
    steps = [metric.step for metric in client.get_metric_history(continued.info.run_id, "loss_total")]
    assert steps == list(range(10, 121, 10))


@pytest.mark.slow
def test_dvc_repro_resumes_after_kill9(tiny_project, ptb_dir):
    project = tiny_project
    write_params(project / "params.yaml", ptb_dir, **LONG_RUN)
    run(["dvc", "repro", "tokenize"], project)
    saved_step = kill_after_first_state(["dvc", "repro", "train_baseline"], project, project.parent / "repro.log")

    output = run(["dvc", "repro", "train_baseline"], project)

    assert f"resuming from step {saved_step} of 120" in output.stdout + output.stderr
    run(train_command("baseline", out=str(project.parent / "clean"),
                      checkpoint_dir=str(project.parent / "clean-state")), project)
    clean = read_outputs(project.parent / "clean", "baseline")
    assert (project / "models/baseline/model.safetensors").read_bytes() == clean["weights"]
    assert json.loads((project / "metrics/train_baseline.json").read_text()) == clean["metrics"]
    assert not state_files(project)
    assert "up to date" in run(["dvc", "status", "train_baseline"], project).stdout


@pytest.mark.parametrize("stage", ["train_baseline", "train_samba"])
def test_resume_key_covers_stage_code(stage):
    # A training state may be resumed only by the code that wrote it, so the key hashes every
    # samba/ folder and file that dvc.yaml lists as the training stages' code.
    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    listed = {dep.removeprefix("samba/") for dep in stages[stage]["deps"] if dep.startswith("samba/")}
    assert listed == set(resume.TRAINING_CODE)

