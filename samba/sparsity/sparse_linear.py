"""Matmuls with a sparse input vector for batch-1 CPU decode: multiply only the weight rows of nonzero inputs.

For y = x W^T with x of n features and k nonzeros, the dense product reads all n columns
of W. Stored transposed as (n, out), the k needed rows are contiguous, and
F.embedding_bag with per-sample weights sums x_j * W^T[j] over the nonzero j without
copying them first, so the work scales with k instead of n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Share of nonzero inputs below which the sparse path wins. NOTE: an estimate from
# docs/benchmarks-sparsity.md (one CPU thread, d_model 1024); recalibrate on other hardware.
DEFAULT_MAX_DENSITY = 0.25


def sparse_input_matvec(x: Tensor, weight_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """Return x @ weight_t (+ bias) for one input vector x (in_features,), reading only rows where x != 0.

    weight_t is the transposed weight, (in_features, out_features), contiguous.
    """
    index = x.nonzero().squeeze(1)
    if index.numel() == 0:
        out = weight_t.new_zeros(weight_t.shape[1])
    else:
        out = F.embedding_bag(index.unsqueeze(0), weight_t, per_sample_weights=x[index].unsqueeze(0).to(weight_t.dtype),
                              mode="sum").squeeze(0)
    return out + bias if bias is not None else out


class SparseInputLinear(nn.Module):
    """A linear layer for decode that takes the sparse path when the input's nonzero share is at most max_density.

    It keeps its own transposed copy of the weight, so build it from a trained nn.Linear
    after training. Inputs other than a single vector (batch 1, one position) run dense.
    """

    def __init__(self, linear: nn.Linear, max_density: float = DEFAULT_MAX_DENSITY) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)
        self.max_density = max_density

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() != x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        vector = x.reshape(-1)
        if (vector != 0).sum().item() > self.max_density * vector.numel():
            return F.linear(x, self.weight, self.bias)
        bias = self.bias.detach() if self.bias is not None else None
        return sparse_input_matvec(vector, self.weight_t, bias).reshape(*x.shape[:-1], -1)
