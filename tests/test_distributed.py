"""Data-parallel training: batch shards, the torchrun environment, and 2 CPU processes against 1."""

from __future__ import annotations

import csv
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run, tool_env
from samba.data.stream import TrainStream
from samba.train.distributed import SINGLE_PROCESS, DistributedContext, context_from_env
from train_workspace import make_workspace, start, state_files, train_command

IDS = torch.arange(1000)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_stack_to_global_batch(world_size):
    whole = TrainStream(IDS, batch_size=8, seq_len=5)
    shards = [TrainStream(IDS, batch_size=8, seq_len=5, rank=rank, world_size=world_size)
              for rank in range(world_size)]
    for step in (0, 3, 40):
        inputs, targets = whole.batch(step)
        assert torch.equal(torch.cat([shard.batch(step)[0] for shard in shards]), inputs)
        assert torch.equal(torch.cat([shard.batch(step)[1] for shard in shards]), targets)
    assert shards[0].local_batch_size == 8 // world_size
    assert shards[0].batch_size == 8


def test_shard_needs_divisible_batch():
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        TrainStream(IDS, batch_size=8, seq_len=5, rank=0, world_size=3)


def test_context_without_torchrun():
    assert context_from_env({}) == SINGLE_PROCESS
    assert SINGLE_PROCESS.is_main
    assert not SINGLE_PROCESS.is_distributed


def test_context_from_torchrun_variables():
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    context = context_from_env(environ)
    assert context == DistributedContext(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert not context.is_main
    assert context.is_distributed


def test_context_rejects_rank_outside_world():
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2"):
        context_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(processes: int, command: list[str]) -> list[str]:
    """Return a torchrun command line that keeps all traffic on the loopback interface."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--no-python", *command]


def loss_curve(out: Path, kind: str) -> dict[int, dict[str, float]]:
    with (out / "plots" / f"train_{kind}.csv").open(encoding="utf-8") as handle:
        return {int(row.pop("step")): {key: float(value) for key, value in row.items() if key.startswith("loss")}
                for row in csv.DictReader(handle)}


# The largest differences measured between 2 processes and 1 (tiny Samba, 40 steps): 1e-6 in
# the losses, written with 6 decimals, and 1.2e-6 in any weight. Float32 sums in another order
# cause them, so the bounds leave room for other CPUs.
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture
def gloo_env(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, ptb_dir, gloo_env):
    workspace = make_workspace(tmp_path / "ws", ptb_dir, train={"steps": 40, "log_every": 5},
                               tracking={"enabled": False})
    run(train_command("samba", out="single"), workspace)
    output = run(torchrun(2, train_command("samba", out="ddp")), workspace)

    assert "on 2 process(es)" in output.stderr
    single, ddp = loss_curve(workspace / "single", "samba"), loss_curve(workspace / "ddp", "samba")
    assert list(ddp) == list(single) == list(range(5, 41, 5))
    for step, losses in single.items():
        for key, value in losses.items():
            assert abs(ddp[step][key] - value) <= LOSS_TOLERANCE, (step, key)
    single_weights = load_file(workspace / "single" / "samba" / "model.safetensors")
    ddp_weights = load_file(workspace / "ddp" / "samba" / "model.safetensors")
    for name, tensor in single_weights.items():
        assert (ddp_weights[name] - tensor).abs().max().item() <= WEIGHT_TOLERANCE, name


@pytest.mark.slow
def test_two_processes_resume_after_kill9(tmp_path, ptb_dir, gloo_env):
    workspace = make_workspace(tmp_path / "ws", ptb_dir, train={"steps": 200, "checkpoint_every": 10, "log_every": 10},
                               tracking={"enabled": False})
    run(torchrun(2, train_command("baseline", out="clean")), workspace)
    launcher = start(torchrun(2, train_command("baseline", out="killed")), workspace, tmp_path / "killed.log",
                     env={**tool_env(), "GLOO_SOCKET_IFNAME": "lo"})
    deadline = time.monotonic() + 300
    while not state_files(workspace) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert launcher.poll() is None, (tmp_path / "killed.log").read_text()
    # torchrun starts each worker in a session of its own, so kill the workers by pid, then torchrun.
    workers = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    for pid in (*workers, launcher.pid):
        os.kill(pid, signal.SIGKILL)
    launcher.wait()

    rerun = run(torchrun(2, train_command("baseline", out="killed")), workspace)

    assert "resuming from step" in rerun.stderr
    clean = (workspace / "clean" / "baseline" / "model.safetensors").read_bytes()
    assert (workspace / "killed" / "baseline" / "model.safetensors").read_bytes() == clean
