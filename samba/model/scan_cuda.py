"""mamba-ssm's fused CUDA kernels behind the layouts of this package.

mamba-ssm (state-spaces/mamba, tested against its 2.x interface) takes channels-first
tensors: u and delta (batch, d_inner, length), B and C (batch, d_state, length). Its scan
returns y and the last state only, and starts from a zero state.

NOTE: this module has not run on a GPU in this repository's CI; tests/test_gpu.py checks
it against the float64 reference when a GPU and mamba-ssm are present, and
benchmarks/gpu_check.sh runs those tests.
"""

from __future__ import annotations

from torch import Tensor


def fused_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
    """Run mamba-ssm's selective_scan_fn on channels-last inputs. Returns (y, last_state).

    u, delta (batch, length, d_inner); B, C (batch, length, d_state); A (d_inner, d_state)
    and D (d_inner,) in float32. y comes back (batch, length, d_inner) in u's dtype.
    """
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    y, last_state = selective_scan_fn(
        u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.contiguous(),
        B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float().contiguous(),
        return_last_state=True,
    )
    return y.transpose(1, 2), last_state


def fused_causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Apply causal_conv1d_fn followed by SiLU. x and the result are (batch, length, d_inner).

    weight is the depthwise Conv1d weight (d_inner, 1, d_conv).
    """
    from causal_conv1d import causal_conv1d_fn

    out = causal_conv1d_fn(x.transpose(1, 2).contiguous(), weight.squeeze(1), bias, activation="silu")
    return out.transpose(1, 2)

