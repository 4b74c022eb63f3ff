"""Training loop, optimizer groups, schedule and checkpoints on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from samba.data.stream import TrainStream
from samba.model import MambaConfig, ReadoutConfig, build_model
from samba.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from samba.train.optim import parameter_groups, warmup_cosine
from samba.train.trainer import StepRecord, TrainConfig, seed_everything, train

TINY = MambaConfig(vocab_size=40, d_model=16, n_layers=2, d_state=4)
READOUT = ReadoutConfig(hidden_size=8)


def tiny_run(kind: str, steps: int = 6, seed: int = 0, records: list | None = None):
    seed_everything(seed)
    model = build_model(kind, TINY, READOUT if kind == "samba" else None)
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(0, TINY.vocab_size, (2000,), generator=generator)
    stream = TrainStream(ids, batch_size=4, seq_len=12)
    config = TrainConfig(steps=steps, lr=3e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.1, grad_clip=1.0,
                         log_every=2, readout_weight=0.5 if kind == "samba" else 0.0,
                         pruning_weight=0.1 if kind == "samba" else 0.0)
    summary = train(model, stream, config, on_log=records.append if records is not None else None)
    return model, summary


def test_warmup_then_cosine():
    kwargs = {"peak_lr": 1.0, "min_lr": 0.1, "warmup_steps": 4, "total_steps": 14}
    assert warmup_cosine(0, **kwargs) == pytest.approx(0.25)
    assert warmup_cosine(3, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine(4, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine(9, **kwargs) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(14, **kwargs) == pytest.approx(0.1)
    assert warmup_cosine(100, **kwargs) == pytest.approx(0.1)


def test_no_weight_decay_on_ssm_parameters():
    model = build_model("samba", TINY, READOUT)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    decay_ids = {id(p) for p in decay["params"]}
    for name, param in model.named_parameters():
        if name.endswith(("A_log", "D", "dt_proj.bias")) or "norm" in name:
            assert id(param) in no_decay_ids, name
    assert id(model.backbone.embedding.weight) in decay_ids
    assert no_decay["weight_decay"] == 0.0
    assert not decay_ids & no_decay_ids


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_training_lowers_loss(kind):
    records: list[StepRecord] = []
    _, summary = tiny_run(kind, steps=30, records=records)
    assert summary.steps == 30
    assert summary.tokens == 30 * 4 * 12
    assert records[-1].losses["loss_main"] < records[0].losses["loss_main"]
    expected = {"loss_total", "loss_main"} | ({"loss_readout", "loss_pruning"} if kind == "samba" else set())
    assert set(records[0].losses) == expected
    assert [record.step for record in records] == list(range(2, 31, 2))


def test_training_is_bit_identical():
    first, _ = tiny_run("samba", steps=5)
    second, _ = tiny_run("samba", steps=5)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_seed_changes_weights():
    first, _ = tiny_run("baseline", steps=2, seed=0)
    second, _ = tiny_run("baseline", steps=2, seed=1)
    assert not torch.equal(first.state_dict()["embedding.weight"],
                           second.state_dict()["embedding.weight"])


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_checkpoint_round_trip(tmp_path, kind):
    model, _ = tiny_run(kind, steps=2)
    save_checkpoint(tmp_path, model, kind, TINY, READOUT if kind == "samba" else None, extra={"steps": 2})
    loaded, config = load_checkpoint(tmp_path)
    assert config["kind"] == kind
    assert config["steps"] == 2
    inputs = torch.randint(0, TINY.vocab_size, (2, 9))
    model.eval()
    assert torch.equal(model(inputs).logits, loaded(inputs).logits)


def test_checkpoint_truncated(tmp_path):
    model, _ = tiny_run("baseline", steps=1)
    save_checkpoint(tmp_path, model, "baseline", TINY, None)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        load_checkpoint(tmp_path)


def test_checkpoint_other_shape(tmp_path):
    model, _ = tiny_run("baseline", steps=1)
    save_checkpoint(tmp_path, model, "baseline", TINY, None)
    config = (tmp_path / "config.json").read_text().replace('"d_state": 4', '"d_state": 8')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)


def test_checkpoint_missing(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent")
