"""Sparsity of SSM states: exact zeros, near zeros (relative and absolute) and Hoyer's measure.

A "token vector" is every state value of one layer at one position: d_inner * d_state
values for states shaped (..., d_inner, d_state). Pass `token_dims=1` for states already
flattened to (..., features). The relative measures compare values within a token
vector, so multiplying all states by a constant leaves them unchanged. The absolute
threshold does not have this property, and it is reported only for comparison.

Per-token quantities are computed in float64, and counts are kept as exact integers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_STATE_DIMS = 2  # (..., d_inner, d_state)


def exact_zero_fraction(h: Tensor) -> float:
    """Return the fraction of values of `h` that are exactly 0."""
    _check_nonempty(h)
    return (h == 0).sum().item() / h.numel()


def near_zero_fraction_absolute(h: Tensor, threshold: float = 1e-3) -> float:
    """Return the fraction of values with |h| <= threshold. It changes when h is rescaled."""
    _check_nonempty(h)
    return _count_below_absolute(h, threshold) / h.numel()


def near_zero_fraction_relative(h: Tensor, threshold: float, *, token_dims: int = _STATE_DIMS) -> float:
    """Return the fraction of values with |h| <= threshold * RMS of their token vector.

    An all-zero token vector counts as all near zero, because 0 <= threshold * 0.
    """
    tokens = _token_vectors(h, token_dims)
    return _count_below_relative(tokens, threshold) / tokens.numel()


def hoyer(h: Tensor, *, token_dims: int = _STATE_DIMS) -> float:
    """Return Hoyer's sparsity (sqrt(n) - L1/L2) / (sqrt(n) - 1), averaged over token vectors.

    n is the number of values per token vector. The measure is 1 for a one-hot vector and
    0 for a vector of equal magnitudes. An all-zero vector has no L1/L2 ratio and is
    defined here as 1.0, the sparsest value.
    """
    tokens = _token_vectors(h, token_dims)
    return _hoyer_sum(tokens) / tokens.shape[0]


class SparsityAccumulator:
    """Sparsity of every layer's states over many batches, from exact running counts.

    `result()` equals the functions above applied to all batches concatenated, and not a
    mean of per-batch means.
    """

    def __init__(self, n_layers: int, relative_threshold: float, absolute_threshold: float = 1e-3) -> None:
        if n_layers < 1:
            raise ValueError(f"n_layers must be positive, got {n_layers}")
        if not (math.isfinite(relative_threshold) and relative_threshold >= 0):
            raise ValueError(f"relative_threshold must be a finite number >= 0, got {relative_threshold!r}")
        if not (math.isfinite(absolute_threshold) and absolute_threshold >= 0):
            raise ValueError(f"absolute_threshold must be a finite number >= 0, got {absolute_threshold!r}")
        self.n_layers = n_layers
        self.relative_threshold = relative_threshold
        self.absolute_threshold = absolute_threshold
        self._layers = [_LayerCounts() for _ in range(n_layers)]

    @torch.no_grad()
    def update(self, states: list[Tensor]) -> None:
        """Add one batch: one (batch, length, d_inner, d_state) tensor per layer."""
        if len(states) != self.n_layers:
            raise ValueError(f"expected the states of {self.n_layers} layers, got {len(states)}")
        for index, (counts, h) in enumerate(zip(self._layers, states)):
            if h.dim() < 3:
                raise ValueError(f"layer {index} states must be (batch, length, d_inner, d_state), got shape {tuple(h.shape)}")
            counts.add(h, self.relative_threshold, self.absolute_threshold)

    def result(self) -> dict:
        """Return {"overall": metrics, "layers": [metrics per layer]}.

        Each metrics dict has exact_zero_fraction, near_zero_fraction_relative,
        near_zero_fraction_absolute, hoyer (mean over token vectors), mean_abs,
        nonzero_per_token (mean count of nonzero values per token vector) and
        features_per_token (values per token vector). "overall" weighs every value of
        every layer equally. Its nonzero_per_token is the mean over all layers' token
        vectors, so the nonzero count of all layers at one position is that times n_layers.
        """
        if self._layers[0].n_values == 0:
            raise ValueError("no states were added: call update() with at least one batch first")
        return {"overall": _LayerCounts.merge(self._layers).metrics(), "layers": [layer.metrics() for layer in self._layers]}


class _LayerCounts:
    """Exact running sums for one layer (Python ints and float64 sums)."""

    def __init__(self) -> None:
        self.n_values = 0
        self.n_tokens = 0
        self.features = 0
        self.exact_zero = 0
        self.near_relative = 0
        self.near_absolute = 0
        self.abs_sum = 0.0
        # Sum over token vectors of hoyer * features, so layers of different widths merge by value count.
        self.hoyer_weighted_sum = 0.0

    def add(self, h: Tensor, relative_threshold: float, absolute_threshold: float) -> None:
        tokens = _token_vectors(h, _STATE_DIMS)
        if self.features and tokens.shape[1] != self.features:
            raise ValueError(f"states changed size: {tokens.shape[1]} values per token vector, earlier {self.features} "
                             "(use one SparsityAccumulator per model)")
        self.features = tokens.shape[1]
        self.n_values += tokens.numel()
        self.n_tokens += tokens.shape[0]
        self.exact_zero += int((tokens == 0).sum().item())
        self.near_relative += _count_below_relative(tokens, relative_threshold)
        self.near_absolute += _count_below_absolute(tokens, absolute_threshold)
        self.abs_sum += tokens.abs().sum().item()
        self.hoyer_weighted_sum += _hoyer_sum(tokens) * self.features

    @classmethod
    def merge(cls, layers: list[_LayerCounts]) -> _LayerCounts:
        merged = cls()
        for name in ("n_values", "n_tokens", "exact_zero", "near_relative", "near_absolute",
                     "abs_sum", "hoyer_weighted_sum"):
            setattr(merged, name, sum(getattr(layer, name) for layer in layers))
        merged.features = merged.n_values / merged.n_tokens  # Mean width; equal to each layer's when all match.
        return merged

    def metrics(self) -> dict:
        return {
            "exact_zero_fraction": self.exact_zero / self.n_values,
            "near_zero_fraction_relative": self.near_relative / self.n_values,
            "near_zero_fraction_absolute": self.near_absolute / self.n_values,
            "hoyer": self.hoyer_weighted_sum / self.n_values,
            "mean_abs": self.abs_sum / self.n_values,
            "nonzero_per_token": (self.n_values - self.exact_zero) / self.n_tokens,
            "features_per_token": self.features,
        }


def _token_vectors(h: Tensor, token_dims: int) -> Tensor:
    """Reshape h to (n_tokens, features) in float64, each row one token vector."""
    if token_dims < 1 or h.dim() < token_dims:
        raise ValueError(f"token_dims must be between 1 and h.dim()={h.dim()}, got {token_dims}")
    _check_nonempty(h)
    features = math.prod(h.shape[h.dim() - token_dims:])
    return h.detach().reshape(-1, features).to(torch.float64)


def _count_below_relative(tokens: Tensor, threshold: float) -> int:
    rms = tokens.square().mean(dim=1, keepdim=True).sqrt()  # (n_tokens, 1)
    return int((tokens.abs() <= threshold * rms).sum().item())


def _count_below_absolute(h: Tensor, threshold: float) -> int:
    # float64 like the other measures, so a float32 value just above 1e-3 is not rounded onto it.
    return int((h.detach().to(torch.float64).abs() <= threshold).sum().item())


def _hoyer_sum(tokens: Tensor) -> float:
    """Return the sum of Hoyer's measure over the rows of `tokens` (n_tokens, features)."""
    features = tokens.shape[1]
    if features < 2:
        raise ValueError(f"Hoyer's measure needs at least 2 values per token vector, got {features}")
    l1 = tokens.abs().sum(dim=1)
    l2 = tokens.square().sum(dim=1).sqrt()
    root_n = math.sqrt(features)
    measure = (root_n - l1 / l2) / (root_n - 1)
    return torch.where(l2 > 0, measure, torch.ones_like(measure)).sum().item()


def _check_nonempty(h: Tensor) -> None:
    if h.numel() == 0:
        raise ValueError(f"states are empty (shape {tuple(h.shape)})")
