"""What a Samba model sparsifies, where, and how hard: the `sparsity` params section as a dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

PENALTIES = ("l1", "l1_rms")
METHODS = ("none", "topk", "magnitude")
SITES = ("ssm_state", "block_output", "inner")


@dataclass(frozen=True)
class SparsityConfig:
    """Training penalty, enforcement method and site of a sparse model.

    penalty: `l1` (mean |v|, lowered by shrinking v alone) or `l1_rms` (mean over token
        vectors of mean |v| / RMS(v), unchanged when v is rescaled); its weight is the
        loss's pruning_weight.
    method: how values become exact zeros. `none` keeps only the zeros training made,
        `topk` keeps the largest (1 - target) share of |v| per token and layer in training
        and evaluation, and `magnitude` zeroes |v| <= a per-layer threshold calibrated
        after training on validation data to reach `target`.
    site: the tensor that is penalised and sparsified: `ssm_state` (the states h_t that the
        readout reads), `block_output` (each layer's residual-stream output, read by the
        next layer's in_proj) or `inner` (the gated SSM output that out_proj reads).
    target: share of exact zeros that topk and magnitude aim for, in [0, 1).
    calibration_tokens: validation tokens whose values calibrate the magnitude thresholds.
    sweep: targets at which evaluation also applies topk and magnitude post hoc.
    """

    penalty: str = "l1"
    method: str = "none"
    site: str = "ssm_state"
    target: float = 0.9
    calibration_tokens: int = 1024
    sweep: tuple[float, ...] = field(default=(0.5, 0.75, 0.9, 0.95))

    def __post_init__(self) -> None:
        for name, allowed in (("penalty", PENALTIES), ("method", METHODS), ("site", SITES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SparsityConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for value in (self.target, *self.sweep):
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise ValueError(f"sparsity targets must be in [0, 1), got {value!r}")
        if self.calibration_tokens < 1:
            raise ValueError(f"SparsityConfig.calibration_tokens must be positive, got {self.calibration_tokens}")
        object.__setattr__(self, "sweep", tuple(self.sweep))

    @property
    def label(self) -> str:
        """Name of the method in reports: the penalty, plus the enforcement when there is one."""
        if self.method == "none":
            return self.penalty
        return f"{self.method} {100 * self.target:g}% ({self.penalty} penalty)"

    def to_dict(self) -> dict:
        values = asdict(self)
        values["sweep"] = list(self.sweep)
        return values
