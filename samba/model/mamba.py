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

from samba.model.config import MambaConfig
from samba.model.output import LMOutput
from samba.model.scan import selective_scan


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
        # Normalise in float32 at least, because the mean of squares underflows in half types.
        x_float = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


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

    def causal_conv(self, x: Tensor) -> Tensor:
        """Apply the depthwise conv over time with d_conv - 1 zeros of left padding only.

        The output at position t depends on inputs t - d_conv + 1 .. t only.
        x and the result are (batch, length, d_inner).
        """
        x = x.transpose(1, 2)  # (batch, d_inner, length), the layout Conv1d expects
        x = F.pad(x, (self.d_conv - 1, 0))
        return self.conv1d(x).transpose(1, 2)

    def forward(self, hidden: Tensor, return_states: bool = False) -> tuple[Tensor, Tensor | None]:
        """Mix hidden (batch, length, d_model) along time.

        Returns the output (batch, length, d_model) and, if return_states, every SSM
        state h_t as (batch, length, d_inner, d_state), else None.
        """
        # 1. Project the input to the SSM branch x and the gate z, each (batch, length, d_inner).
        x, z = self.in_proj(hidden).chunk(2, dim=-1)

        # 2. Causal depthwise convolution over time, then SiLU.
        x = F.silu(self.causal_conv(x))

        # 3. Selection: the step size delta and the matrices B and C depend on the input.
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # (batch, length, d_inner), positive

        # 4. Selective scan with A = -exp(A_log) < 0, which keeps every exp(delta * A) in (0, 1).
        # The scan adds the skip term D * x.
        A = -torch.exp(self.A_log.float())
        sparse_states = self.state_sparsifier is not None
        scan = selective_scan(x, delta, A, B, C, self.D, return_states=return_states or sparse_states)
        y, states = scan.y, scan.states
        if sparse_states:
            # y_t = C_t . h_t + D x_t from the zeroed states; the recurrence keeps the dense
            # ones (samba/sparsity/sparsifier.py gives the reason).
            states = self.state_sparsifier(states)
            y = torch.einsum("bldn,bln->bld", states, C.to(states.dtype)).to(x.dtype) + self.D * x

        # 5. Gate with SiLU(z) and project back to d_model.
        y = y * F.silu(z)
        if self.inner_sparsifier is not None:
            y = self.inner_sparsifier(y)
        return self.out_proj(y), states if return_states else None


class ResidualBlock(nn.Module):
    """Pre-norm residual block: hidden + mixer(RMSNorm(hidden))."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MambaBlock(config)
        self.output_sparsifier: nn.Module | None = None  # enforced zeros on the block output

    def forward(self, hidden: Tensor, return_states: bool = False) -> tuple[Tensor, Tensor | None]:
        mixed, states = self.mixer(self.norm(hidden), return_states=return_states)
        hidden = hidden + mixed
        if self.output_sparsifier is not None:
            hidden = self.output_sparsifier(hidden)
        return hidden, states


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

    def forward(self, input_ids: Tensor, return_states: bool = False) -> LMOutput:
        """Compute next-token logits for input_ids (batch, length).

        With return_states, the output also carries each layer's SSM states h_t,
        one (batch, length, d_inner, d_state) tensor per layer.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        hidden = self.embedding(input_ids)  # (batch, length, d_model)
        all_states: list[Tensor] = []
        for layer in self.layers:
            hidden, states = layer(hidden, return_states=return_states)
            if states is not None:
                all_states.append(states)
        logits = self.lm_head(self.norm_f(hidden))  # (batch, length, vocab_size)
        return LMOutput(logits=logits, states=all_states if return_states else None)

    def num_parameters(self) -> int:
        """Count the parameters, the tied embedding and head weight once."""
        # Module.parameters() yields a shared Parameter only once.
        return sum(parameter.numel() for parameter in self.parameters())
