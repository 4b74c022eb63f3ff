"""Selective scan of Mamba-1 (the S6 layer of Gu & Dao 2023) in pure PyTorch.

For each channel d and state index n the scan runs the discretised SSM

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = C_t . h_t + D * u_t

with zero-order hold for A (Abar = exp(delta * A)) and the simplified Euler step for B
(Bbar * u = delta * B * u), as Mamba does.

Shape legend (all tensors are channels-last):
    batch    sequences in the batch
    length   positions in each sequence
    d_inner  SSM channels (expand * d_model)
    d_state  state size N per channel

    u, delta   (batch, length, d_inner)
    A          (d_inner, d_state), already negative: A = -exp(A_log)
    B, C       (batch, length, d_state)
    D          (d_inner,)
    h0, h_t    (batch, d_inner, d_state)
    states     (batch, length, d_inner, d_state), h_t at every position

`selective_scan_reference` is the sequential definition, meant to run in float64 as the
ground truth in tests. `selective_scan` is the path the model uses and has the same
inputs. It runs one of three implementations, chosen in samba.model.backend: the C kernel
for CPU tensors (scan_cpu), the pure-PyTorch chunked scan (scan_torch) or mamba-ssm's
fused CUDA kernel (scan_cuda). Tests hold each of them to the reference on outputs,
final state and every gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from samba.model.backend import kernel_for
from samba.model.scan_cpu import cpu_kernel_scan
from samba.model.scan_cuda import fused_scan
from samba.model.scan_torch import chunked_scan


class ScanOutput(NamedTuple):
    """Result of a selective scan.

    y is (batch, length, d_inner). states is (batch, length, d_inner, d_state), or None
    unless the caller requested it. last_state is (batch, d_inner, d_state).
    """

    y: Tensor
    states: Tensor | None
    last_state: Tensor


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None) -> None:
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, length, d_inner), got {tuple(u.shape)}")
    batch, length, d_inner = u.shape
    if length == 0:
        raise ValueError("selective scan needs length >= 1, got an input with length 0")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must have shape (d_inner={d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, matrix in (("B", B), ("C", C)):
        if matrix.shape != (batch, length, d_state):
            raise ValueError(
                f"{name} must have shape (batch, length, d_state) = {(batch, length, d_state)}, "
                f"got {tuple(matrix.shape)}"
            )
    if D.shape != (d_inner,):
        raise ValueError(f"D must have shape (d_inner,) = ({d_inner},), got {tuple(D.shape)}")
    if h0 is not None and h0.shape != (batch, d_inner, d_state):
        raise ValueError(f"h0 must have shape (batch, d_inner, d_state) = {(batch, d_inner, d_state)}, got {tuple(h0.shape)}")


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    h0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the scan one position at a time, written straight from the recurrence.

    Computes in the dtype of the inputs, so tests pass float64 tensors. Returns
    (y, states, last_state) with the shapes of the module legend.
    """
    _check_shapes(u, delta, A, B, C, D, h0)
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    h = h0 if h0 is not None else u.new_zeros(batch, d_inner, d_state)

    ys, states = [], []
    for t in range(length):
        delta_t = delta[:, t, :, None]  # (batch, d_inner, 1)
        A_bar = torch.exp(delta_t * A)  # (batch, d_inner, d_state)
        B_bar_u = delta_t * B[:, t, None, :] * u[:, t, :, None]  # (batch, d_inner, d_state)
        h = A_bar * h + B_bar_u
        ys.append((h * C[:, t, None, :]).sum(dim=-1) + D * u[:, t])
        states.append(h)
    return torch.stack(ys, dim=1), torch.stack(states, dim=1), h


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    *,
    h0: Tensor | None = None,
    return_states: bool = False,
) -> ScanOutput:
    """Run the selective scan over the whole sequence with the backend of samba.model.backend.

    The recurrence runs in float32, or in float64 when any input is float64, because
    products of many exp(delta * A) factors lose too much precision in half types. Autocast
    does not change this. y comes back in the dtype of u, so that it feeds the next
    layer directly. states and last_state stay in the compute dtype, so a scan continued
    from last_state through h0 keeps that precision.
    """
    _check_shapes(u, delta, A, B, C, D, h0)
    out_dtype = u.dtype
    compute_dtype = torch.float32
    for tensor in (u, delta, A, B, C, D, h0):
        if tensor is not None:
            compute_dtype = torch.promote_types(compute_dtype, tensor.dtype)
    kernel = kernel_for(u)

    with torch.autocast(u.device.type, enabled=False):
        if kernel == "cuda" and h0 is None and not return_states and compute_dtype == torch.float32:
            y, last_state = fused_scan(*(tensor.float() for tensor in (u, delta, A, B, C, D)))
            return ScanOutput(y=y.to(out_dtype), states=None, last_state=last_state)
        u, delta, A, B, C, D = (tensor.to(compute_dtype) for tensor in (u, delta, A, B, C, D))
        h0 = h0.to(compute_dtype) if h0 is not None else None
        scan = cpu_kernel_scan if kernel == "cpu" else chunked_scan
        y, states, last_state = scan(u, delta, A, B, C, D, h0, return_states)
    return ScanOutput(y=y.to(out_dtype), states=states, last_state=last_state)
