"""The training loop: AdamW, warmup + cosine schedule, gradient clipping, a seed.

On CPU the same config, data and seed give bit-identical weights: the batches are
a pure function of the step and no nondeterministic kernels are allowed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from samba.data.stream import TrainStream
from samba.loss import LossParts, compute_loss
from samba.train.optim import build_optimizer, warmup_cosine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    log_every: int
    readout_weight: float = 0.0
    pruning_weight: float = 0.0
    penalty: str = "l1"  # samba.loss.penalty kind: l1 or l1_rms


@dataclass(frozen=True)
class StepRecord:
    """The averages over one logging interval, reported at its last step (1-based)."""

    step: int
    losses: dict[str, float]
    lr: float
    grad_norm: float
    tokens_per_s: float


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    tokens: int
    seconds: float
    final: dict[str, float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def _loss_values(parts: LossParts) -> dict[str, float]:
    values = {"loss_total": parts.total.item(), "loss_main": parts.main.item()}
    if parts.readout is not None:
        values["loss_readout"] = parts.readout.item()
    if parts.pruning is not None:
        values["loss_pruning"] = parts.pruning.item()
    return values


def train(model: nn.Module, stream: TrainStream, config: TrainConfig,
          on_log: Callable[[StepRecord], None] | None = None) -> TrainSummary:
    """Train `model` in place for `config.steps` steps on batches `stream.batch(step)`."""
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    tokens_per_step = stream.batch_size * stream.seq_len
    interval_sums: dict[str, float] = {}
    interval_steps, interval_start = 0, time.perf_counter()
    train_start = interval_start
    last = {}
    for step in range(config.steps):
        lr = warmup_cosine(step, peak_lr=config.lr, min_lr=config.min_lr,
                           warmup_steps=config.warmup_steps, total_steps=config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = stream.batch(step)
        output = model(inputs)
        parts = compute_loss(output, targets, readout_weight=config.readout_weight,
                             pruning_weight=config.pruning_weight, penalty_kind=config.penalty)
        values = _loss_values(parts)
        if not all(math.isfinite(value) for value in values.values()):
            raise NonFiniteLossError(f"non-finite loss at step {step + 1}: {values}")
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient norm at step {step + 1} (losses {values})")
        optimizer.step()

        for key, value in values.items():
            interval_sums[key] = interval_sums.get(key, 0.0) + value
        interval_sums["grad_norm"] = interval_sums.get("grad_norm", 0.0) + grad_norm
        interval_steps += 1
        last = values
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            elapsed = time.perf_counter() - interval_start
            record = StepRecord(
                step=step + 1,
                losses={k: v / interval_steps for k, v in interval_sums.items() if k != "grad_norm"},
                lr=lr,
                grad_norm=interval_sums["grad_norm"] / interval_steps,
                tokens_per_s=interval_steps * tokens_per_step / elapsed if elapsed > 0 else 0.0,
            )
            logger.info("step %d/%d  %s  lr %.2e  grad_norm %.3f  %.0f tokens/s", record.step, config.steps,
                        "  ".join(f"{k} {v:.4f}" for k, v in record.losses.items()), lr, record.grad_norm,
                        record.tokens_per_s)
            if on_log is not None:
                on_log(record)
            interval_sums, interval_steps, interval_start = {}, 0, time.perf_counter()
    seconds = time.perf_counter() - train_start
    return TrainSummary(steps=config.steps, tokens=config.steps * tokens_per_step, seconds=seconds, final=last)
