"""Time the matmuls that read a sparsity site on a model's own zeros, dense against the sparse-input path.

Each matmul whose input is the site tensor multiplies real token vectors, one at a time
as in batch-1 decode: once with the dense weight and once through sparse_input_matvec,
which reads only the weight rows of nonzero inputs. The speedup holds for this machine
and this zero pattern. Times are wall clock and vary between runs, so callers keep them
apart from metrics that must be reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samba.sparsity.sparse_linear import site_input_linears, sparse_input_matvec
from samba.sparsity.sparsifier import record_sites


@torch.no_grad()
def site_matmul_inputs(model: nn.Module, kind: str, site: str, inputs: Tensor) -> list[tuple[str, nn.Linear, Tensor]]:
    """Run `inputs` (batch, length) once and return (name, linear, token vectors) per matmul that reads `site`.

    The token vectors are (tokens, in_features), with the zeros the installed sparsifiers
    made. At ssm_state the only reader is the readout's first layer, which reads all
    layers' states of a position at once (a baseline has none). At block_output, in_proj
    and the LM head read the values after an RMSNorm, which keeps their zeros, so the
    recorded values carry the same zero pattern.
    """
    model.eval()
    with record_sites(model) as recorded:
        output = model(inputs) if kind == "samba" else model(inputs, return_states=True)
    if site == "ssm_state":
        if kind != "samba":
            return []
        states = torch.cat([state.flatten(start_dim=-2) for state in output.states], dim=-1)
        return [("readout.input", model.readout.input, states.reshape(-1, states.shape[-1]))]
    readers = site_input_linears(model, site)
    if len(recorded) != len(readers):
        raise ValueError(f"expected {len(readers)} recorded {site} tensors, got {len(recorded)}: "
                         f"install a sparsifier at {site} first")
    return [(name, getattr(owner, attribute), values.reshape(-1, values.shape[-1]))
            for (name, owner, attribute), values in zip(readers, recorded)]


def time_matvecs(linear: nn.Linear, vectors: Tensor, repeats: int = 3) -> dict:
    """Time `linear` on each row of `vectors`, dense and sparse, and return per-token times and the speedup.

    Each path runs once untimed, then `repeats` times over all rows; the fastest pass counts.
    """
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be (tokens, in_features) with at least one token, got {tuple(vectors.shape)}")
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    weight_t = weight.t().contiguous()
    rows = [row.contiguous() for row in vectors.to(weight.dtype)]
    dense = _fastest(lambda row: F.linear(row, weight, bias), rows, repeats)
    sparse = _fastest(lambda row: sparse_input_matvec(row, weight_t, bias), rows, repeats)
    return {
        "weight_shape": list(weight.shape),
        "tokens": len(rows),
        "nonzero_share": (vectors != 0).sum().item() / vectors.numel(),
        "dense_us_per_token": 1e6 * dense / len(rows),
        "sparse_us_per_token": 1e6 * sparse / len(rows),
        "speedup": dense / sparse,
    }


@torch.no_grad()
def _fastest(matvec: Callable[[Tensor], Tensor], rows: list[Tensor], repeats: int) -> float:
    matvec(rows[0])
    best = math.inf
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        for row in rows:
            matvec(row)
        best = min(best, time.perf_counter() - start)
    return best
