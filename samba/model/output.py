"""Forward output shared by the baseline and Samba language models."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class LMOutput:
    """Logits of a language model forward pass, with the SSM states when requested.

    logits: (batch, length, vocab_size), next-token logits of the LM head.
    states: one (batch, length, d_inner, d_state) tensor per layer, or None when the
        forward pass did not return them.
    readout_logits: (batch, length, vocab_size) from the state readout, or None for a
        model without one.
    site_values: one tensor per layer from the sparsity site (samba.sparsity), after its
        enforced zeros, or None when no sparsifier is installed; the pruning loss reads it.
    """

    logits: Tensor
    states: list[Tensor] | None = None
    readout_logits: Tensor | None = None
    site_values: list[Tensor] | None = None
