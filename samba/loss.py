"""Training losses: next-token cross-entropy, readout cross-entropy and the pruning penalties.

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


def rms_normalised_l1(values: list[Tensor], token_dims: int) -> Tensor:
    """Compute the mean over token vectors of mean |v| / RMS(v), a penalty that rescaling cannot lower.

    A token vector is one layer's values at one position (the last `token_dims` dims).
    The ratio is 1 for equal magnitudes and 1/sqrt(n) for a single nonzero of n values,
    and it is unchanged when v is multiplied by any constant, so the model can lower it
    only by making values small relative to the others of their token. An all-zero token
    vector counts as 0. Every token vector of every layer weighs the same.
    """
    if not values:
        raise ValueError("rms_normalised_l1 needs the values of at least one layer, got an empty list")
    ratios = []
    for tensor in values:
        tokens = tensor.flatten(start_dim=tensor.dim() - token_dims).flatten(end_dim=-2)
        tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
        rms = tokens.square().mean(dim=-1).sqrt()
        ratio = tokens.abs().mean(dim=-1) / rms.clamp_min(torch.finfo(rms.dtype).tiny)
        ratios.append(ratio)
    return torch.cat(ratios).mean()


def penalty(values: list[Tensor], kind: str, token_dims: int = 2) -> Tensor:
    """Compute the pruning penalty `kind` (`l1` or `l1_rms`) of one tensor per layer."""
    if kind == "l1":
        return pruning_loss(values)
    if kind == "l1_rms":
        return rms_normalised_l1(values, token_dims)
    raise ValueError(f"invalid penalty {kind!r}: expected l1 or l1_rms")


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
    penalty_kind: str = "l1",
) -> LossParts:
    """Combine the loss terms for targets (batch, length), the next token at each position.

    The readout term is computed when output.readout_logits is set and the pruning term
    when output.states is set, so call the baseline without return_states when training.
    The pruning term is the penalty `penalty_kind` of output.site_values when a sparsifier
    set them (one value per position is a token vector there), else of the states.
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
        if output.site_values is not None and output.site_values[0].dim() == 3:
            pruning = penalty(output.site_values, penalty_kind, token_dims=1)
        else:
            pruning = penalty(output.site_values or output.states, penalty_kind, token_dims=2)
        total = total + pruning_weight * pruning
    return LossParts(total=total, main=main, readout=readout, pruning=pruning)
