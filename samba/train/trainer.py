"""The training loop: AdamW, warmup + cosine schedule, gradient clipping, a seed, resumable state.

On CPU the same config, data and seed give bit-identical weights: the batches are
a pure function of the step and no nondeterministic kernels are allowed. A run that
resumes from a training state (samba.train.train_state) continues bit-identically,
because that state contains everything the loop reads besides the config and the data.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from samba.data.stream import TrainStream
from samba.loss import LossParts, compute_loss
from samba.train.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    broadcast_train_state,
    mean_across_ranks,
    wrap_model,
)
from samba.train.optim import build_optimizer, warmup_cosine
from samba.train.train_state import STATE_FILE, StepRecord, TrainProgress, load_train_state, save_train_state

__all__ = ["NonFiniteLossError", "StepRecord", "TrainConfig", "TrainSummary", "seed_everything", "train"]

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
    checkpoint_every: int = 0  # Steps between training-state saves; 0 saves none.
    penalty: str = "l1"  # samba.loss.penalty kind: l1 or l1_rms


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    tokens: int
    seconds: float
    final: dict[str, float]
    records: list[StepRecord] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""

    def __init__(self, message: str, step: int, losses: dict[str, float]) -> None:
        super().__init__(message)
        self.step = step
        self.losses = losses


def seed_everything(seed: int) -> None:
    # cuBLAS needs a fixed workspace for deterministic matmuls; it reads this before its first call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def _loss_values(parts: LossParts, context: DistributedContext) -> dict[str, float]:
    """Return the loss parts as floats, averaged over all ranks."""
    names = ["loss_total", "loss_main"]
    tensors = [parts.total, parts.main]
    for name, tensor in (("loss_readout", parts.readout), ("loss_pruning", parts.pruning)):
        if tensor is not None:
            names.append(name)
            tensors.append(tensor)
    averaged = mean_across_ranks(torch.stack([tensor.detach().float() for tensor in tensors]), context)
    return dict(zip(names, averaged.tolist()))


def _describe(values: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.6g}" for key, value in values.items())


def train(model: nn.Module, stream: TrainStream, config: TrainConfig,
          on_log: Callable[[StepRecord], None] | None = None, *, checkpoint_dir: Path | None = None,
          state_extra: dict | None = None, context: DistributedContext = SINGLE_PROCESS) -> TrainSummary:
    """Train `model` in place for `config.steps` steps on batches `stream.batch(step)`.

    With `checkpoint_dir`, rank 0 saves the training state there every
    `config.checkpoint_every` steps, together with `state_extra` (JSON values). When a
    state file is already there, training resumes from it. `on_log` runs on rank 0 for each record logged by this call (not for records
    restored from the state). Raises NonFiniteLossError on a NaN or infinite loss or
    gradient norm, before the optimizer applies that step.
    """
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    state_path = checkpoint_dir / STATE_FILE if checkpoint_dir is not None else None
    progress = TrainProgress()
    if context.is_main and state_path is not None and state_path.is_file():
        progress, _ = load_train_state(state_path, model, optimizer)
        logger.info("resuming from step %d of %d (%s)", progress.step, config.steps, state_path)
    resumed_from = broadcast_train_state(model, optimizer, progress.step, context)
    network = wrap_model(model, context)
    model.train()
    tokens_per_step = stream.batch_size * stream.seq_len
    last_saved = resumed_from
    run_start = interval_start = time.perf_counter()
    seconds_before = progress.seconds

    for step in range(resumed_from, config.steps):
        lr = warmup_cosine(step, peak_lr=config.lr, min_lr=config.min_lr,
                           warmup_steps=config.warmup_steps, total_steps=config.steps)
        try:
            values, grad_norm = _optimizer_step(network, model, optimizer, stream.batch(step), step + 1, lr,
                                                config, context)
        except NonFiniteLossError as error:
            if last_saved:
                error.args = (f"{error}; the last good training state (step {last_saved}) is kept in {state_path}",)
            raise

        for key, value in (*values.items(), ("grad_norm", grad_norm)):
            progress.interval_sums[key] = progress.interval_sums.get(key, 0.0) + value
        progress.interval_steps += 1
        progress.step = step + 1
        progress.last = values
        if progress.step % config.log_every == 0 or progress.step == config.steps:
            record = _close_interval(progress, lr, tokens_per_step, time.perf_counter() - interval_start)
            interval_start = time.perf_counter()
            if context.is_main:
                logger.info("step %d/%d  %s  lr %.2e  grad_norm %.3f  %.0f tokens/s", record.step, config.steps,
                            "  ".join(f"{k} {v:.4f}" for k, v in record.losses.items()), lr, record.grad_norm,
                            record.tokens_per_s)
                if on_log is not None:
                    on_log(record)
        if (state_path is not None and context.is_main and config.checkpoint_every
                and progress.step % config.checkpoint_every == 0 and progress.step < config.steps):
            progress.seconds = seconds_before + time.perf_counter() - run_start
            save_train_state(state_path, model, optimizer, progress, extra=state_extra)
            last_saved = progress.step
            logger.info("saved the training state at step %d to %s", progress.step, state_path)

    seconds = seconds_before + time.perf_counter() - run_start
    return TrainSummary(steps=config.steps, tokens=config.steps * tokens_per_step, seconds=seconds,
                        final=progress.last, records=progress.records, resumed_from=resumed_from)


def _optimizer_step(network: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                    batch: tuple[torch.Tensor, torch.Tensor], step: int, lr: float, config: TrainConfig,
                    context: DistributedContext) -> tuple[dict[str, float], float]:
    """Run step number `step` (1-based) at learning rate `lr`; return the rank-averaged loss parts and the gradient norm.

    `network` is `model`, or its DistributedDataParallel wrapper. A non-finite loss or
    gradient norm raises NonFiniteLossError, and the optimizer then leaves the weights as they were.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = next(model.parameters()).device
    inputs, targets = (tensor.to(device) for tensor in batch)
    parts = compute_loss(network(inputs), targets, readout_weight=config.readout_weight,
                         pruning_weight=config.pruning_weight, penalty_kind=config.penalty)
    values = _loss_values(parts, context)
    if not all(math.isfinite(value) for value in values.values()):
        raise NonFiniteLossError(f"non-finite loss at step {step}: {_describe(values)}", step, values)
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {step}, "
                                 f"losses {_describe(values)}", step, values)
    optimizer.step()
    return values, grad_norm


def _close_interval(progress: TrainProgress, lr: float, tokens_per_step: int, elapsed: float) -> StepRecord:
    """Turn the interval sums into a record, append it to the progress and reset the sums."""
    sums, steps = progress.interval_sums, progress.interval_steps
    record = StepRecord(
        step=progress.step,
        losses={key: value / steps for key, value in sums.items() if key != "grad_norm"},
        lr=lr,
        grad_norm=sums["grad_norm"] / steps,
        tokens_per_s=steps * tokens_per_step / elapsed if elapsed > 0 else 0.0,
    )
    progress.records.append(record)
    progress.interval_sums, progress.interval_steps = {}, 0
    return record
