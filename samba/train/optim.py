"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed and non-decayed AdamW groups.

    Parameters marked `_no_weight_decay` (A_log, D, the dt bias and norm weights, as
    the Mamba paper trains them) and every 1-D tensor (biases, norm gains) get no
    weight decay. Tied weights appear once.
    """
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if getattr(param, "_no_weight_decay", False) or param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Return the learning rate at `step` (0-based): linear warmup, then cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)
