"""Training losses: next-token cross-entropy, readout cross-entropy and the pruning loss.

total = main + readout_weight * readout + pruning_weight * pruning. The baseline, whose
output has neither readout logits nor states, trains on main alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from samba.model.output import LMOutput


@dataclass
class LossParts:
    """Scalar loss terms of one batch. readout and pruning are None when not computed."""

    total: Tensor
    main: Tensor
    readout: Tensor | None = None
    pruning: Tensor | None = None


def pruning_loss(states: list[Tensor]) -> Tensor:
    """Compute the mean |h| over every element of every layer's states.

    All elements weigh the same, so a layer with more state values counts more.
    The sum runs in float32 at least.
    """
    if not states:
        raise ValueError("pruning_loss needs the states of at least one layer, got an empty list")
    total_abs = sum(state.abs().sum(dtype=torch.promote_types(state.dtype, torch.float32)) for state in states)
    count = sum(state.numel() for state in states)
    return total_abs / count


def _next_token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    # log-softmax in float32 at least, because half-precision logits lose the small probabilities.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _check_weight(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def compute_loss(
    output: LMOutput,
    targets: Tensor,
    readout_weight: float = 0.5,
    pruning_weight: float = 0.1,
) -> LossParts:
    """Combine the loss terms for targets (batch, length), the next token at each position.

    The readout term is computed when output.readout_logits is set and the pruning term
    when output.states is set, so call the baseline without return_states when training.
    """
    _check_weight("readout_weight", readout_weight)
    _check_weight("pruning_weight", pruning_weight)
    if targets.shape != output.logits.shape[:-1]:
        raise ValueError(
            f"targets must have shape (batch, length) = {tuple(output.logits.shape[:-1])}, got {tuple(targets.shape)}"
        )

    main = _next_token_cross_entropy(output.logits, targets)
    total = main
    readout = None
    if output.readout_logits is not None:
        readout = _next_token_cross_entropy(output.readout_logits, targets)
        total = total + readout_weight * readout
    pruning = None
    if output.states is not None:
        pruning = pruning_loss(output.states)
        total = total + pruning_weight * pruning
    return LossParts(total=total, main=main, readout=readout, pruning=pruning)
