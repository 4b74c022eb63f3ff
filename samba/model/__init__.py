"""Mamba-1 baseline and Samba language models.

Shape legend used throughout the package:
    batch     sequences in a batch (never `B`, which is the SSM input matrix)
    length    positions per sequence
    d_model   width of the residual stream
    d_inner   SSM channels, expand * d_model
    d_state   state size per SSM channel
"""

from __future__ import annotations

from typing import Literal

from samba.model.cache import InferenceCache, LayerCache
from samba.model.config import MambaConfig, ReadoutConfig, SambaConfig
from samba.model.mamba import MambaLM
from samba.model.output import LMOutput
from samba.model.samba import SambaLM
from samba.model.scan import selective_scan, selective_scan_reference

__all__ = [
    "InferenceCache",
    "LMOutput",
    "LayerCache",
    "MambaConfig",
    "MambaLM",
    "ReadoutConfig",
    "SambaConfig",
    "SambaLM",
    "build_model",
    "selective_scan",
    "selective_scan_reference",
]

MODEL_KINDS = ("baseline", "samba")


def build_model(
    kind: Literal["baseline", "samba"],
    mamba: MambaConfig,
    readout: ReadoutConfig | None = None,
) -> MambaLM | SambaLM:
    """Build the baseline Mamba LM or the Samba LM.

    The baseline ignores readout. For Samba, readout None means ReadoutConfig's defaults.
    """
    if kind == "baseline":
        return MambaLM(mamba)
    if kind == "samba":
        return SambaLM(SambaConfig(mamba=mamba, readout=readout if readout is not None else ReadoutConfig()))
    raise ValueError(f"Invalid model kind {kind!r}: expected one of {', '.join(MODEL_KINDS)}")
