"""The selective scan in pure PyTorch: chunked, with recomputation in the backward pass.

The sequence is cut into chunks of `chunk` positions. Inside a chunk the decays
exp(delta_t * A) and the inputs delta_t * B_t * u_t of all positions are computed at once,
and a short loop of one fused multiply-add per position runs the recurrence. Only the
chunk's states exist at any time, plus the state at the start of each chunk, which the
backward pass uses to rebuild that chunk's states instead of storing all of them. Every
tensor inside a chunk is laid out (position, batch, d_inner, d_state), so the slice of
one position is contiguous.

Runs on any device and in any floating dtype; callers pass float32 or float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Positions per chunk. Larger chunks mean fewer Python-level operations but more memory
# per chunk: 6 tensors of (chunk, batch, d_inner, d_state) live during the backward pass.
DEFAULT_CHUNK = 32


def _chunk_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, start: int, end: int):
    """Return delta, u, B (position-major) and the decays and inputs of positions start .. end-1."""
    delta_c = delta[:, start:end].transpose(0, 1)  # (chunk, batch, d_inner)
    u_c = u[:, start:end].transpose(0, 1)
    B_c = B[:, start:end].transpose(0, 1)  # (chunk, batch, d_state)
    decay = torch.exp(delta_c.unsqueeze(-1) * A)  # (chunk, batch, d_inner, d_state)
    drive = (delta_c * u_c).unsqueeze(-1) * B_c.unsqueeze(2)
    return delta_c, u_c, B_c, decay, drive


def _run_chunk(h: Tensor, decay: Tensor, drive: Tensor) -> Tensor:
    """Return the states h_t of one chunk, (chunk, batch, d_inner, d_state), starting from h."""
    states = torch.empty_like(drive)
    for i in range(drive.shape[0]):
        h = torch.addcmul(drive[i], decay[i], h, out=states[i])
    return states


class ChunkedScan(torch.autograd.Function):
    """Autograd function of the chunked scan. Returns (y, states, last_state).

    states is (batch, length, d_inner, d_state) when return_states, else an empty tensor.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, h0, return_states: bool, chunk: int):
        batch, length, d_inner = u.shape
        d_state = A.shape[1]
        h = h0 if h0 is not None else u.new_zeros(batch, d_inner, d_state)
        y = torch.empty_like(u)
        states = u.new_empty(batch, length, d_inner, d_state) if return_states else u.new_empty(0)
        starts = []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            starts.append(h)
            _, _, _, decay, drive = _chunk_inputs(u, delta, A, B, start, end)
            chunk_states = _run_chunk(h, decay, drive)
            h = chunk_states[-1].clone()  # a view would keep the whole chunk alive until the end
            y[:, start:end] = torch.einsum("tbdn,btn->btd", chunk_states, C[:, start:end])
            if return_states:
                states[:, start:end] = chunk_states.transpose(0, 1)
        y += D * u
        ctx.save_for_backward(u, delta, A, B, C, D, torch.stack(starts))
        ctx.chunk = chunk
        ctx.has_h0 = h0 is not None
        if not return_states:
            ctx.mark_non_differentiable(states)
        return y, states, h

    @staticmethod
    def backward(ctx, grad_y, grad_states, grad_last):
        u, delta, A, B, C, D, starts = ctx.saved_tensors
        batch, length, d_inner = u.shape
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y
        has_grad_states = grad_states is not None and grad_states.numel() > 0
        # carry is dLoss/dh_{end-1} through positions end and later.
        carry = torch.zeros_like(starts[0]) if grad_last is None else grad_last
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A)

        n_chunks = starts.shape[0]
        for index in reversed(range(n_chunks)):
            start = index * ctx.chunk
            end = min(start + ctx.chunk, length)
            delta_c, u_c, B_c, decay, drive = _chunk_inputs(u, delta, A, B, start, end)
            chunk_states = _run_chunk(starts[index], decay, drive)
            previous = torch.cat([starts[index].unsqueeze(0), chunk_states[:-1]])
            grad_y_c = grad_y[:, start:end].transpose(0, 1)  # (chunk, batch, d_inner)
            C_c = C[:, start:end].transpose(0, 1)

            # dLoss/dh_t from y_t (and from the states output), then the reverse recurrence
            # g_t = direct_t + decay_{t+1} * g_{t+1}.
            direct = grad_y_c.unsqueeze(-1) * C_c.unsqueeze(2)
            if has_grad_states:
                direct += grad_states[:, start:end].transpose(0, 1)
            grads = torch.empty_like(direct)
            torch.add(direct[-1], carry, out=grads[-1])
            for i in range(end - start - 2, -1, -1):
                torch.addcmul(direct[i], decay[i + 1], grads[i + 1], out=grads[i])
            carry = decay[0] * grads[0]

            # dLoss/d(delta_t * A) of every state element, then the chain rule to each input.
            grad_log_decay = grads * previous * decay
            grad_A += torch.einsum("tbdn,tbd->dn", grad_log_decay, delta_c)
            grad_B_part = torch.einsum("tbdn,tbn->tbd", grads, B_c)  # sum over n of g * B
            grad_delta[:, start:end] = (torch.einsum("tbdn,dn->tbd", grad_log_decay, A)
                                        + grad_B_part * u_c).transpose(0, 1)
            grad_u[:, start:end] = (grad_B_part * delta_c).transpose(0, 1)
            grad_B[:, start:end] = torch.einsum("tbdn,tbd->btn", grads, delta_c * u_c)
            grad_C[:, start:end] = torch.einsum("tbdn,tbd->btn", chunk_states, grad_y_c)

        grad_u += D * grad_y
        grad_D = (grad_y * u).sum(dim=(0, 1))
        return (grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, carry if ctx.has_h0 else None, None, None)


def chunked_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None,
                 return_states: bool, chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor | None, Tensor]:
    """Run the chunked scan on inputs of one dtype. Returns (y, states or None, last_state)."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of positions, got {chunk}")
    y, states, last_state = ChunkedScan.apply(u, delta, A, B, C, D, h0, return_states, chunk)
    return y, states if return_states else None, last_state
