"""Sparsity of SSM states or other site tensors: exact zeros, near zeros, Hoyer, dead units, firing rates.

A "token vector" is every state value of one layer at one position: d_inner * d_state
values for states shaped (..., d_inner, d_state). Pass `token_dims=1` for states already
flattened to (..., features). The relative measures compare values within a token
vector, so multiplying all states by a constant leaves them unchanged. The absolute
threshold does not have this property, and it is reported only for comparison.

Per-token norms are reduced in the states' own dtype (float32 for a model's states) and
summed over tokens in float64. Threshold comparisons are exact, and counts are kept as
exact integers.
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

    def __init__(self, n_layers: int, relative_threshold: float, absolute_threshold: float = 1e-3,
                 token_dims: int = _STATE_DIMS) -> None:
        if n_layers < 1:
            raise ValueError(f"n_layers must be positive, got {n_layers}")
        if not (math.isfinite(relative_threshold) and relative_threshold >= 0):
            raise ValueError(f"relative_threshold must be a finite number >= 0, got {relative_threshold!r}")
        if not (math.isfinite(absolute_threshold) and absolute_threshold >= 0):
            raise ValueError(f"absolute_threshold must be a finite number >= 0, got {absolute_threshold!r}")
        self.n_layers = n_layers
        self.relative_threshold = relative_threshold
        self.absolute_threshold = absolute_threshold
        self.token_dims = token_dims
        self._layers = [_LayerCounts(token_dims) for _ in range(n_layers)]

    @torch.no_grad()
    def update(self, states: list[Tensor]) -> None:
        """Add one batch: one tensor per layer, (batch, length, d_inner, d_state) for states."""
        if len(states) != self.n_layers:
            raise ValueError(f"expected the states of {self.n_layers} layers, got {len(states)}")
        for index, (counts, h) in enumerate(zip(self._layers, states)):
            if h.dim() < 1 + self.token_dims:
                raise ValueError(f"layer {index} values must have {self.token_dims} token dims after the batch dims, "
                                 f"got shape {tuple(h.shape)}")
            counts.add(h, self.relative_threshold, self.absolute_threshold)

    def result(self) -> dict:
        """Return {"overall": metrics, "layers": [metrics per layer]}.

        Each metrics dict has exact_zero_fraction, near_zero_fraction_relative,
        near_zero_fraction_absolute, hoyer (mean over token vectors), mean_abs,
        nonzero_per_token (mean count of nonzero values per token vector) and
        features_per_token (values per token vector). "overall" weighs every value of
        every layer equally. Its nonzero_per_token is the mean over all layers' token
        vectors, so the nonzero count of all layers at one position is that times n_layers.

        They also have mean_abs_over_rms (mean over token vectors of mean |v| / RMS(v)),
        dead_fraction (share of features never nonzero over all tokens added) and
        abs_over_rms_histogram (counts of log10(|v| / RMS) in HISTOGRAM_EDGES bins, plus
        the exact zeros). Each layer also has channel_firing_rate: per channel (first
        token dim) the share of its values that are nonzero. Every number except mean_abs
        and near_zero_fraction_absolute is unchanged when all values are multiplied by a
        nonzero constant.
        """
        if self._layers[0].n_values == 0:
            raise ValueError("no states were added: call update() with at least one batch first")
        layers = []
        for layer in self._layers:
            metrics = layer.metrics()
            metrics["channel_firing_rate"] = layer.channel_firing_rate()
            layers.append(metrics)
        return {"overall": _LayerCounts.merge(self._layers).metrics(), "layers": layers}


# log10(|v| / token RMS) bin edges of the histogram: 1e-8 .. 1e2 in tenths of a decade.
HISTOGRAM_EDGES = [-8.0 + 0.1 * index for index in range(101)]


class _LayerCounts:
    """Exact running sums for one layer (Python ints and float64 sums)."""

    def __init__(self, token_dims: int = _STATE_DIMS) -> None:
        self.token_dims = token_dims
        self.channel_shape: tuple[int, ...] = ()
        self.nonzero_per_feature: Tensor | None = None  # int64 (features,) counts over tokens
        self.ratio_sum = 0.0
        self.histogram = [0] * (len(HISTOGRAM_EDGES) - 1)
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
        tokens = _token_vectors(h, self.token_dims)
        if self.features and tokens.shape[1] != self.features:
            raise ValueError(f"states changed size: {tokens.shape[1]} values per token vector, earlier {self.features} "
                             "(use one SparsityAccumulator per model)")
        self.channel_shape = tuple(h.shape[h.dim() - self.token_dims:])
        nonzero = (tokens != 0).sum(dim=0, dtype=torch.int64)
        self.nonzero_per_feature = nonzero if self.nonzero_per_feature is None else self.nonzero_per_feature + nonzero
        n_zero = tokens.numel() - int(nonzero.sum().item())
        l1, l2 = _token_norms(tokens)
        rms = l2 / math.sqrt(tokens.shape[1])
        self.features = tokens.shape[1]
        self.n_values += tokens.numel()
        self.n_tokens += tokens.shape[0]
        self.exact_zero += n_zero
        self.near_relative += _count_within(tokens, relative_threshold * rms)
        self.near_absolute += _count_within(tokens, torch.tensor(absolute_threshold, dtype=torch.float64))
        self.abs_sum += l1.sum().item()
        self.hoyer_weighted_sum += _hoyer_from_norms(l1, l2, self.features).sum().item() * self.features
        safe_rms = torch.where(rms > 0, rms, torch.ones_like(rms))
        self.ratio_sum += (l1 / self.features / safe_rms).sum().item()
        self._add_histogram(tokens, safe_rms, n_zero)

    def _add_histogram(self, tokens: Tensor, safe_rms: Tensor, n_zero: int) -> None:
        """Count the nonzero values in bins of log10(|v| / token RMS). Outliers land in the end bins."""
        low, high = HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1]
        scale = safe_rms.to(tokens.dtype).unsqueeze(1)
        relative = tokens.abs().div_(scale).log10_().clamp_(low, high)  # Exact zeros go to the first bin.
        counts = torch.histc(relative, bins=len(HISTOGRAM_EDGES) - 1, min=low, max=high).to(torch.int64)
        counts[0] -= n_zero
        self.histogram = [old + new for old, new in zip(self.histogram, counts.tolist())]

    def channel_firing_rate(self) -> list[float]:
        """Return per channel (first token dim) the share of its values over all tokens that are nonzero."""
        per_channel = self.nonzero_per_feature.reshape(self.channel_shape[0], -1).sum(dim=1).to(torch.float64)
        values_per_channel = self.n_tokens * (self.features // self.channel_shape[0])
        return [round(rate, 6) for rate in (per_channel / values_per_channel).tolist()]

    @classmethod
    def merge(cls, layers: list[_LayerCounts]) -> _LayerCounts:
        merged = cls()
        for name in ("n_values", "n_tokens", "exact_zero", "near_relative", "near_absolute",
                     "abs_sum", "hoyer_weighted_sum", "ratio_sum"):
            setattr(merged, name, sum(getattr(layer, name) for layer in layers))
        merged.features = merged.n_values / merged.n_tokens  # Mean width; equal to each layer's when all match.
        merged.histogram = [sum(column) for column in zip(*(layer.histogram for layer in layers))]
        merged.nonzero_per_feature = torch.cat([layer.nonzero_per_feature for layer in layers])
        return merged

    def metrics(self) -> dict:
        return {
            "mean_abs_over_rms": self.ratio_sum / self.n_tokens,
            "dead_fraction": (self.nonzero_per_feature == 0).sum().item() / self.nonzero_per_feature.numel(),
            "abs_over_rms_histogram": {"log10_edges": [round(edge, 6) for edge in HISTOGRAM_EDGES],
                                       "counts": self.histogram, "exact_zeros": self.exact_zero},
            "exact_zero_fraction": self.exact_zero / self.n_values,
            "near_zero_fraction_relative": self.near_relative / self.n_values,
            "near_zero_fraction_absolute": self.near_absolute / self.n_values,
            "hoyer": self.hoyer_weighted_sum / self.n_values,
            "mean_abs": self.abs_sum / self.n_values,
            "nonzero_per_token": (self.n_values - self.exact_zero) / self.n_tokens,
            "features_per_token": self.features,
        }


def _token_vectors(h: Tensor, token_dims: int) -> Tensor:
    """Reshape h to (n_tokens, features), each row one token vector, in its floating dtype."""
    if token_dims < 1 or h.dim() < token_dims:
        raise ValueError(f"token_dims must be between 1 and h.dim()={h.dim()}, got {token_dims}")
    _check_nonempty(h)
    features = math.prod(h.shape[h.dim() - token_dims:])
    tokens = h.detach().reshape(-1, features)
    return tokens if tokens.is_floating_point() else tokens.to(torch.float64)


def _token_norms(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Return the L1 and L2 norm of each row of `tokens`, reduced in its dtype and returned as float64."""
    l1 = torch.linalg.vector_norm(tokens, 1, dim=1).to(torch.float64)
    l2 = torch.linalg.vector_norm(tokens, 2, dim=1).to(torch.float64)
    return l1, l2


def _count_within(tokens: Tensor, bound: Tensor) -> int:
    """Count the values with |v| <= bound, exactly as if compared in float64.

    `bound` is float64, a scalar or one value per row. It is rounded down to the dtype of
    `tokens`, so a float32 value just above 1e-3 is not rounded onto the bound.
    """
    below = bound.to(tokens.dtype)
    below = torch.where(below.to(torch.float64) > bound, torch.nextafter(below, torch.full_like(below, -math.inf)),
                        below)
    if below.dim():
        below = below.unsqueeze(1)
    return int(torch.count_nonzero((tokens <= below) & (tokens >= -below)).item())


def _count_below_relative(tokens: Tensor, threshold: float) -> int:
    _, l2 = _token_norms(tokens)
    return _count_within(tokens, threshold * l2 / math.sqrt(tokens.shape[1]))


def _count_below_absolute(h: Tensor, threshold: float) -> int:
    return _count_within(h.detach().reshape(-1), torch.tensor(threshold, dtype=torch.float64))


def _hoyer_from_norms(l1: Tensor, l2: Tensor, features: int) -> Tensor:
    """Return Hoyer's measure per row from its L1 and L2 norms, and 1.0 for an all-zero row."""
    if features < 2:
        raise ValueError(f"Hoyer's measure needs at least 2 values per token vector, got {features}")
    root_n = math.sqrt(features)
    measure = (root_n - l1 / torch.where(l2 > 0, l2, torch.ones_like(l2))) / (root_n - 1)
    return torch.where(l2 > 0, measure, torch.ones_like(measure))


def _hoyer_sum(tokens: Tensor) -> float:
    """Return the sum of Hoyer's measure over the rows of `tokens` (n_tokens, features)."""
    return _hoyer_from_norms(*_token_norms(tokens), tokens.shape[1]).sum().item()


def _check_nonempty(h: Tensor) -> None:
    if h.numel() == 0:
        raise ValueError(f"states are empty (shape {tuple(h.shape)})")
