"""Matmuls with a sparse input vector for batch-1 CPU decode: multiply only the weight rows of nonzero inputs.

For y = x W^T with x of n features and k nonzeros, the dense product reads all n columns
of W. Stored transposed as (n, out), the k needed rows are contiguous, and
F.embedding_bag with per-sample weights sums x_j * W^T[j] over the nonzero j without
copying them first, so the work scales with k instead of n.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samba.sparsity.config import SITES

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


def site_input_linears(model: nn.Module, site: str) -> list[tuple[str, nn.Module, str]]:
    """List the linear layers that decode runs on `site`'s tensor, as (qualified name, owner, attribute).

    `model` is a MambaLM or a SambaLM (whose `backbone` is one). At `inner` each layer's
    out_proj reads the sparsified gated output itself. At `block_output` the sparsified
    output of layer i passes through layer i + 1's RMSNorm into its in_proj, and the last
    layer's through norm_f into the LM head. RMSNorm only scales each feature, so its output
    is zero wherever its input is. `ssm_state` lists nothing: the states feed only the
    readout's first layer, which decode does not run.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    if site == "ssm_state":
        return []
    backbone = getattr(model, "backbone", model)
    if site == "inner":
        readers = [(layer.mixer, "out_proj") for layer in backbone.layers]
    else:
        readers = [(layer.mixer, "in_proj") for layer in backbone.layers[1:]]
        readers.append((backbone, "lm_head"))
    module_names = {id(module): name for name, module in model.named_modules()}
    return [(f"{module_names[id(owner)]}.{attribute}".lstrip("."), owner, attribute) for owner, attribute in readers]


@contextmanager
def sparse_input_linears(model: nn.Module, site: str,
                         max_density: float = DEFAULT_MAX_DENSITY) -> Iterator[list[str]]:
    """Replace the nn.Linear layers that read `site`'s tensor with SparseInputLinear while the block runs.

    Yields the qualified names of the replaced layers (none for ssm_state) and puts the
    original layers back on exit, also after an error. Each replacement shares its
    layer's weight and holds a transposed copy of it, so the weights must not change
    inside the block. The outputs equal the dense ones up to float rounding.
    """
    readers = site_input_linears(model, site)
    for name, owner, attribute in readers:
        layer = getattr(owner, attribute)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__}, not an nn.Linear: "
                             "leave the enclosing sparse_input_linears block before entering another")
    originals = [(owner, attribute, getattr(owner, attribute)) for _, owner, attribute in readers]
    for owner, attribute, linear in originals:
        setattr(owner, attribute, SparseInputLinear(linear, max_density))
    try:
        yield [name for name, _, _ in readers]
    finally:
        for owner, attribute, linear in originals:
            setattr(owner, attribute, linear)
