"""Model configurations: the Mamba-1 backbone and the Samba readout."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class MambaConfig:
    """Sizes and initialisation ranges of a Mamba-1 language model (Gu & Dao 2023)."""

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None means ceil(d_model / 16), as in the Mamba paper.
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        if self.dt_rank is not None and self.dt_rank <= 0:
            raise ValueError(f"MambaConfig.dt_rank must be positive or None, got {self.dt_rank!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"MambaConfig needs 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReadoutConfig:
    """The MLP that reads all layers' SSM states at one position and predicts the next token."""

    hidden_size: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            raise ValueError(f"ReadoutConfig.hidden_size must be a positive integer, got {self.hidden_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SambaConfig:
    """A Mamba backbone plus a state readout."""

    mamba: MambaConfig
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)

    def to_dict(self) -> dict:
        return {"mamba": self.mamba.to_dict(), "readout": self.readout.to_dict()}
