"""The inference cache of recurrent generation: per layer, the conv window and the SSM state.

A Mamba layer at position t depends on the past only through two tensors: the last d_conv
inputs of its causal convolution and its SSM state h_{t-1}. Carrying both lets a model
process a prompt once (prefill) and then one token at a time (step) with the same
outputs as one forward pass over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LayerCache:
    """The recurrent state of one Mamba layer after the positions seen so far.

    conv_window: (batch, d_conv, d_inner), the last d_conv inputs of the causal conv,
        oldest first; None before the first position, which means all zeros.
    ssm_state: (batch, d_inner, d_state), the SSM state h of the last position, in the
        scan's compute dtype; None before the first position, which means all zeros.
    """

    conv_window: Tensor | None = None
    ssm_state: Tensor | None = None


@dataclass
class InferenceCache:
    """The LayerCache of every layer and the number of positions they have seen."""

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> InferenceCache:
        """Return the cache of a model that has seen no position yet."""
        return cls(layers=[LayerCache() for _ in range(n_layers)])
