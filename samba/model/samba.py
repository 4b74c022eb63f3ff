"""Samba: a Mamba-1 language model plus an MLP readout over the SSM states of all layers.

At each position the readout takes every layer's state h_t (d_inner x d_state values per
layer) as one dense feature vector and predicts the next token from it. Training pushes
those states to be sparse (see samba.loss.pruning_loss), and the readout measures how
much of the prediction the sparse states still carry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samba.model.cache import InferenceCache
from samba.model.config import SambaConfig
from samba.model.mamba import MambaLM
from samba.model.output import LMOutput
from samba.sparsity.sparsifier import record_sites


class StateReadout(nn.Module):
    """MLP from the concatenated SSM states of all layers to next-token logits.

    Feature j of the input is state index j % d_state of channel (j // d_state) % d_inner
    in layer j // (d_inner * d_state), so column j of `input.weight` is read only when
    that state value is nonzero.
    """

    def __init__(self, n_layers: int, d_inner: int, d_state: int, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.d_inner = d_inner
        self.d_state = d_state
        self.input = nn.Linear(n_layers * d_inner * d_state, hidden_size)
        self.output = nn.Linear(hidden_size, vocab_size)
        for linear in (self.input, self.output):
            nn.init.zeros_(linear.bias)
            linear.bias._no_weight_decay = True

    @property
    def num_features(self) -> int:
        return self.n_layers * self.d_inner * self.d_state

    def forward(self, states: list[Tensor]) -> Tensor:
        """Map one (batch, length, d_inner, d_state) tensor per layer to (batch, length, vocab_size)."""
        if len(states) != self.n_layers:
            raise ValueError(f"StateReadout expects states of {self.n_layers} layers, got {len(states)}")
        for layer, state in enumerate(states):
            if state.ndim != 4 or state.shape[-2:] != (self.d_inner, self.d_state):
                raise ValueError(
                    f"StateReadout expects layer {layer} states of shape (batch, length, "
                    f"{self.d_inner}, {self.d_state}), got {tuple(state.shape)}"
                )
        # Layer-major, then channel, then state index, the order the class docstring gives.
        features = torch.cat([state.flatten(start_dim=-2) for state in states], dim=-1)
        return self.output(F.gelu(self.input(features)))


class SambaLM(nn.Module):
    """Mamba-1 language model whose forward pass also returns the states and readout logits."""

    def __init__(self, config: SambaConfig) -> None:
        super().__init__()
        self.config = config
        mamba = config.mamba
        self.backbone = MambaLM(mamba)
        self.readout = StateReadout(
            n_layers=mamba.n_layers,
            d_inner=mamba.d_inner,
            d_state=mamba.d_state,
            hidden_size=config.readout.hidden_size,
            vocab_size=mamba.vocab_size,
        )

    def forward(self, input_ids: Tensor, cache: InferenceCache | None = None) -> LMOutput:
        """Compute main logits, states and readout logits for input_ids (batch, length).

        With a cache, the sequence continues after the cached positions (see MambaLM.forward).
        """
        with record_sites(self.backbone) as site_values:
            output = self.backbone(input_ids, return_states=True, cache=cache)
        output.readout_logits = self.readout(output.states)
        output.site_values = site_values or None
        return output

    def step(self, input_ids: Tensor, cache: InferenceCache) -> LMOutput:
        """Compute main and readout logits (batch, vocab_size) for one token per sequence, input_ids (batch,).

        states contains each layer's h_t as (batch, d_inner, d_state). Advances `cache` by one position.
        """
        output = self.backbone.step(input_ids, cache, return_states=True)
        # The readout takes (batch, length, d_inner, d_state) per layer; here length is 1.
        readout_logits = self.readout([state.unsqueeze(1) for state in output.states])
        output.readout_logits = readout_logits.squeeze(1)
        return output

    def new_cache(self) -> InferenceCache:
        """Return an empty inference cache for `forward(..., cache=)` and `step`."""
        return self.backbone.new_cache()

    def num_parameters(self) -> int:
        """Count the parameters of backbone and readout, the tied embedding and head weight once."""
        return sum(parameter.numel() for parameter in self.parameters())
