"""Mamba-1 language model: the selective SSM block of Gu & Dao 2023, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces" (arXiv:2312.00752), Algorithm 2 and Section 3.

Every weight gets its final initial value in the constructor of the module that owns it.
No model-wide pass re-initialises weights afterwards, so the SSM initialisation below
cannot be overwritten by accident. Parameters that must not be weight-decayed carry the
attribute `_no_weight_decay = True`, which the optimizer groups read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samba.model.backend import kernel_for
from samba.model.cache import InferenceCache, LayerCache
from samba.model.config import MambaConfig
from samba.model.fused import causal_conv, causal_conv_silu, rms_norm, silu_gate, softplus_from_output
from samba.model.output import LMOutput
from samba.model.scan import selective_scan
from samba.model.scan_cuda import fused_causal_conv


def _exclude_from_weight_decay(parameter: nn.Parameter | None) -> None:
    if parameter is not None:
        parameter._no_weight_decay = True


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned per-feature gain and no bias."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        _exclude_from_weight_decay(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        # Normalises in float32 at least, because the mean of squares underflows in half types.
        return rms_norm(x, self.weight, self.eps)


class MambaBlock(nn.Module):
    """Mamba-1 mixer: gated causal convolution followed by the selective SSM (S6).

    Input and output are (batch, length, d_model).
    """

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.d_inner = config.d_inner
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.dt_rank = config.resolved_dt_rank

        self.in_proj = nn.Linear(config.d_model, 2 * self.d_inner, bias=False)
        # Depthwise: each channel has its own kernel over time. The left padding is
        # applied in causal_conv, so the layer itself pads nothing.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)
        # Enforced zeros on the states or on out_proj's input (samba.sparsity.install sets them).
        self.state_sparsifier: nn.Module | None = None
        self.inner_sparsifier: nn.Module | None = None

        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

        self._init_dt_proj(config)
        # GPT-2 style rescale of the last projection of each pre-norm residual branch, so
        # the residual stream's variance does not grow with depth. mamba_ssm applies the
        # same 1/sqrt(n_layers) factor to the default out_proj init (_init_weights in
        # mamba_ssm/models/mixer_seq_simple.py).
        with torch.no_grad():
            self.out_proj.weight.div_(math.sqrt(config.n_layers))

        for parameter in (self.A_log, self.D, self.dt_proj.bias, self.conv1d.bias):
            _exclude_from_weight_decay(parameter)

    def _init_dt_proj(self, config: MambaConfig) -> None:
        """Initialise dt_proj so that softplus(dt_proj.bias), the step size delta at zero input, is in [dt_min, dt_max].

        Each channel's step size is drawn log-uniform in that range, floored at
        dt_init_floor and stored through the inverse softplus. The weight is uniform in
        +-dt_rank**-0.5.
        """
        bound = self.dt_rank**-0.5
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
        ).clamp(min=config.dt_init_floor)
        # Inverse of softplus(x) = log(1 + exp(x)): x = dt + log(1 - exp(-dt)).
        inverse_softplus_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.weight.uniform_(-bound, bound)
            self.dt_proj.bias.copy_(inverse_softplus_dt)

    def causal_conv(self, x: Tensor, window: Tensor | None = None) -> Tensor:
        """Apply the depthwise conv over time, causally.

        x and the result are (batch, length, d_inner). The output at position t depends on
        inputs t - d_conv + 1 .. t only. The inputs before the first position come from
        `window` (batch, d_conv, d_inner), the last d_conv inputs seen so far, or are
        zeros when window is None.
        """
        history = window[:, 1:] if window is not None else None
        return causal_conv(x, self.conv1d.weight[:, 0, :], self.conv1d.bias, history)

    def _ssm_parameters(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return delta, A, B and C for the conv output x (..., d_inner).

        delta and A are computed in float32 at least, also under autocast, because the
        decays exp(delta * A) multiply over many positions.
        """
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        compute_dtype = torch.promote_types(self.dt_proj.weight.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            weight, bias = self.dt_proj.weight.to(compute_dtype), self.dt_proj.bias.to(compute_dtype)
            delta = softplus_from_output(F.linear(dt.to(compute_dtype), weight, bias))  # positive
            A = -torch.exp(self.A_log.to(compute_dtype))
        return delta, A, B, C

    def forward(self, hidden: Tensor, return_states: bool = False,
                cache: LayerCache | None = None) -> tuple[Tensor, Tensor | None]:
        """Mix hidden (batch, length, d_model) along time.

        Returns the output (batch, length, d_model) and, if return_states, every SSM
        state h_t as (batch, length, d_inner, d_state), else None. With a cache, the
        sequence continues from the cached conv window and SSM state, and the cache is
        updated to the last position.
        """
        # 1. Project the input to the SSM branch x and the gate z, each (batch, length, d_inner).
        x, z = self.in_proj(hidden).chunk(2, dim=-1)

        # 2. Causal depthwise convolution over time, then SiLU.
        window = cache.conv_window if cache is not None else None
        conv_input = x
        if window is not None:
            x = F.silu(self.causal_conv(x, window))
        elif kernel_for(x) == "cuda":
            x = fused_causal_conv(x, self.conv1d.weight, self.conv1d.bias)  # conv and SiLU in one kernel
        else:
            x = causal_conv_silu(x, self.conv1d.weight[:, 0, :], self.conv1d.bias)

        # 3. Selection: the step size delta and the matrices B and C depend on the input.
        # 4. Selective scan with A = -exp(A_log) < 0, which keeps every exp(delta * A) in (0, 1).
        # The scan adds the skip term D * x.
        delta, A, B, C = self._ssm_parameters(x)
        h0 = cache.ssm_state if cache is not None else None
        sparse_states = self.state_sparsifier is not None
        scan = selective_scan(x, delta, A, B, C, self.D, h0=h0, return_states=return_states or sparse_states)
        if cache is not None:
            cache.conv_window = self._next_window(window, conv_input)
            cache.ssm_state = scan.last_state
        y, states = scan.y, scan.states
        if sparse_states:
            # y_t = C_t . h_t + D x_t from the zeroed states; the recurrence and the cache keep
            # the dense ones (samba/sparsity/sparsifier.py gives the reason).
            states = self.state_sparsifier(states)
            y = torch.einsum("bldn,bln->bld", states, C.to(states.dtype)).to(scan.y.dtype) + self.D * x

        # 5. Gate with SiLU(z) and project back to d_model.
        y = silu_gate(y, z)
        if self.inner_sparsifier is not None:
            y = self.inner_sparsifier(y)
        return self.out_proj(y), states if return_states else None

    def _next_window(self, window: Tensor | None, inputs: Tensor) -> Tensor:
        """Return the last d_conv conv inputs after `inputs` (batch, length, d_inner) follow `window`."""
        if window is None:
            window = inputs.new_zeros(inputs.shape[0], self.d_conv, self.d_inner)
        return torch.cat([window.to(inputs.dtype), inputs], dim=1)[:, -self.d_conv:]

    def step(self, hidden: Tensor, cache: LayerCache) -> tuple[Tensor, Tensor]:
        """Process one position: hidden (batch, d_model) -> output (batch, d_model) and h_t (batch, d_inner, d_state).

        Runs the recurrence of `forward` for a single position and advances `cache`.
        """
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # each (batch, d_inner)

        window = self._next_window(cache.conv_window, x.unsqueeze(1))  # (batch, d_conv, d_inner)
        cache.conv_window = window
        weight = self.conv1d.weight[:, 0, :].transpose(0, 1)  # (d_conv, d_inner)
        x = F.silu((window * weight).sum(dim=1) + self.conv1d.bias)

        delta, A, B, C = self._ssm_parameters(x)
        with torch.autocast(x.device.type, enabled=False):
            x_c, B, C = (tensor.to(delta.dtype) for tensor in (x, B, C))
            decay = torch.exp(delta.unsqueeze(-1) * A)  # (batch, d_inner, d_state)
            h = (delta * x_c).unsqueeze(-1) * B.unsqueeze(1)
            if cache.ssm_state is not None:
                h = h + decay * cache.ssm_state
        cache.ssm_state = h
        if self.state_sparsifier is not None:
            # Zeros reach y and the returned states; the cache keeps the dense recurrence, as in forward.
            h = self.state_sparsifier(h.unsqueeze(1)).squeeze(1)
        with torch.autocast(x.device.type, enabled=False):
            y = torch.einsum("bdn,bn->bd", h, C) + self.D * x_c

        y = y.to(x.dtype) * F.silu(z)
        if self.inner_sparsifier is not None:
            y = self.inner_sparsifier(y)
        return self.out_proj(y), h


class ResidualBlock(nn.Module):
    """Pre-norm residual block: hidden + mixer(RMSNorm(hidden))."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MambaBlock(config)
        self.output_sparsifier: nn.Module | None = None  # enforced zeros on the block output

    def forward(self, hidden: Tensor, return_states: bool = False,
                cache: LayerCache | None = None) -> tuple[Tensor, Tensor | None]:
        mixed, states = self.mixer(self.norm(hidden), return_states=return_states, cache=cache)
        hidden = hidden + mixed
        if self.output_sparsifier is not None:
            hidden = self.output_sparsifier(hidden)
        return hidden, states

    def step(self, hidden: Tensor, cache: LayerCache) -> tuple[Tensor, Tensor]:
        mixed, state = self.mixer.step(self.norm(hidden), cache)
        hidden = hidden + mixed
        if self.output_sparsifier is not None:
            hidden = self.output_sparsifier(hidden)
        return hidden, state


class MambaLM(nn.Module):
    """Mamba-1 language model: embedding, residual Mamba blocks, final RMSNorm, tied LM head."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        with torch.no_grad():
            self.embedding.weight.normal_(mean=0.0, std=0.02)
        self.layers = nn.ModuleList(ResidualBlock(config) for _ in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        # Tie the head to the embedding, as mamba_ssm's MambaLMHeadModel does.
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids: Tensor, return_states: bool = False,
                cache: InferenceCache | None = None) -> LMOutput:
        """Compute next-token logits for input_ids (batch, length).

        With return_states, the output also carries each layer's SSM states h_t,
        one (batch, length, d_inner, d_state) tensor per layer. With a cache (see
        `new_cache`), the sequence continues after the cached positions and the cache
        advances past input_ids: this is the prefill of recurrent generation.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        layer_caches = self._layer_caches(cache)
        hidden = self.embedding(input_ids)  # (batch, length, d_model)
        all_states: list[Tensor] = []
        for layer, layer_cache in zip(self.layers, layer_caches):
            hidden, states = layer(hidden, return_states=return_states, cache=layer_cache)
            if states is not None:
                all_states.append(states)
        if cache is not None:
            cache.length += input_ids.shape[1]
        logits = self.lm_head(self.norm_f(hidden))  # (batch, length, vocab_size)
        return LMOutput(logits=logits, states=all_states if return_states else None)

    def step(self, input_ids: Tensor, cache: InferenceCache, return_states: bool = False) -> LMOutput:
        """Compute the next-token logits (batch, vocab_size) for one token per sequence, input_ids (batch,).

        Continues from `cache` and advances it by one position. The result equals the
        logits at that position of one forward pass over the whole sequence. With
        return_states, states contains each layer's h_t as (batch, d_inner, d_state).
        """
        if input_ids.ndim != 1:
            raise ValueError(f"step input_ids must have shape (batch,), got {tuple(input_ids.shape)}")
        layer_caches = self._layer_caches(cache)
        hidden = self.embedding(input_ids)  # (batch, d_model)
        all_states = []
        for layer, layer_cache in zip(self.layers, layer_caches):
            hidden, state = layer.step(hidden, layer_cache)
            all_states.append(state)
        cache.length += 1
        logits = self.lm_head(self.norm_f(hidden))
        return LMOutput(logits=logits, states=all_states if return_states else None)

    def new_cache(self) -> InferenceCache:
        """Return an empty inference cache for `forward(..., cache=)` and `step`."""
        return InferenceCache.empty(len(self.layers))

    def _layer_caches(self, cache: InferenceCache | None) -> list[LayerCache | None]:
        if cache is None:
            return [None] * len(self.layers)
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"the cache has {len(cache.layers)} layers but the model has {len(self.layers)}: "
                             "create it with model.new_cache()")
        return list(cache.layers)

    def num_parameters(self) -> int:
        """Count the parameters, the tied embedding and head weight once."""
        # Module.parameters() yields a shared Parameter only once.
        return sum(parameter.numel() for parameter in self.parameters())
