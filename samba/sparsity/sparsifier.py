"""Enforced zeros at a sparsity site: top-k and magnitude sparsifiers, their installation and calibration.

A sparsifier sits on one tensor per layer (the site, see SparsityConfig) and zeroes values
of it. The model calls it where the site's tensor is produced, so every matmul that reads
the tensor reads the zeros:

- ssm_state: the zeroed states feed the readout's first layer and y_t = C_t . h_t, but the
  recurrence h_t = exp(delta A) h_{t-1} + delta B x_t carries the dense states. The state
  update is elementwise, so zeros in it would save no matmul columns, and zeroing inside the
  recurrence would rule out the parallel scan. The exact zeros reported for this site are
  zeros of the zeroed states, which is exactly what the readout and the C contraction read.
- block_output: the zeroed residual stream feeds the next layer's RMSNorm, which keeps
  zeros, and then its in_proj (after the last layer: norm_f and the LM head).
- inner: the zeroed gated output y * SiLU(z) feeds out_proj.

Gradients flow through the kept values only: the zero mask is treated as a constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from samba.sparsity.config import SparsityConfig

# Where each site's sparsifier lives: (attribute name, owner class name).
_SITE_ATTRIBUTES = {
    "ssm_state": ("state_sparsifier", "MambaBlock"),
    "inner": ("inner_sparsifier", "MambaBlock"),
    "block_output": ("output_sparsifier", "ResidualBlock"),
}
# Values per token vector span the last dims: (d_inner, d_state) for states, one dim otherwise.
SITE_TOKEN_DIMS = {"ssm_state": 2, "block_output": 1, "inner": 1}


def topk_keep_count(features: int, target: float) -> int:
    """Return k, the values kept per token vector of `features` values for a target share of zeros.

    k is rounded down, so at least `target` of the values are zero (0.9 of 4096 keeps 409, not
    410), except that one value is always kept.
    """
    # The small tolerance keeps float error from dropping an exact product, e.g. (1 - 0.8) * 10.
    return max(1, min(features, math.floor((1.0 - target) * features + 1e-9)))


class Sparsifier(nn.Module):
    """Zero values of one layer's site tensor: `none` passes it through, `topk` or `magnitude` zero it.

    topk keeps the k largest |v| of each token vector (the last `token_dims` dims), ties
    broken by torch.topk, so each token vector has at most k nonzeros and exactly k when
    no kept value is 0. magnitude keeps |v| > threshold. The threshold is a non-persistent
    buffer, so checkpoints never contain it.
    """

    def __init__(self, method: str, token_dims: int, target: float = 0.0, threshold: float = 0.0) -> None:
        super().__init__()
        if method not in ("none", "topk", "magnitude"):
            raise ValueError(f"Sparsifier method must be none, topk or magnitude, got {method!r}")
        self.method = method
        self.token_dims = token_dims
        self.target = target
        self.register_buffer("threshold", torch.tensor(float(threshold)), persistent=False)

    def forward(self, values: Tensor) -> Tensor:
        if self.method == "none":
            return values
        if self.method == "magnitude":
            return values * (values.abs() > self.threshold)
        tokens = values.flatten(start_dim=values.dim() - self.token_dims)
        k = topk_keep_count(tokens.shape[-1], self.target)
        kept = tokens.abs().topk(k, dim=-1).indices
        mask = torch.zeros_like(tokens, dtype=torch.bool).scatter_(-1, kept, True)
        return (tokens * mask).reshape(values.shape)

    def extra_repr(self) -> str:
        return f"method={self.method}, target={self.target:g}, threshold={self.threshold.item():.4g}"


def _site_owners(model: nn.Module, site: str) -> list[nn.Module]:
    attribute, owner = _SITE_ATTRIBUTES[site]
    owners = [module for module in model.modules() if type(module).__name__ == owner and hasattr(module, attribute)]
    if not owners:
        raise ValueError(f"model has no {owner} with a {attribute}: it is not a Mamba or Samba model")
    return owners


def install(model: nn.Module, site: str, method: str, target: float = 0.0,
            thresholds: list[float] | None = None) -> list[Sparsifier]:
    """Put one Sparsifier per layer at `site` and remove those at other sites; return them in layer order.

    method `none` installs pass-through sparsifiers, which only mark the site for
    `record_sites`. At ssm_state even those recompute y from the states, so the outputs
    change only by float rounding. magnitude needs one threshold per layer.
    """
    for other in _SITE_ATTRIBUTES:
        if other != site:
            for module in _site_owners(model, other):
                setattr(module, _SITE_ATTRIBUTES[other][0], None)
    owners = _site_owners(model, site)
    if method == "magnitude" and (thresholds is None or len(thresholds) != len(owners)):
        raise ValueError(f"magnitude needs one threshold per layer ({len(owners)}), got {thresholds!r}")
    sparsifiers = []
    for index, owner in enumerate(owners):
        threshold = thresholds[index] if method == "magnitude" else 0.0
        sparsifier = Sparsifier(method, SITE_TOKEN_DIMS[site], target, threshold)
        setattr(owner, _SITE_ATTRIBUTES[site][0], sparsifier)
        sparsifiers.append(sparsifier)
    return sparsifiers


def remove(model: nn.Module) -> None:
    """Remove every sparsifier, so the model runs as trained without enforced zeros."""
    for site, (attribute, _) in _SITE_ATTRIBUTES.items():
        for module in _site_owners(model, site):
            setattr(module, attribute, None)


def install_config(model: nn.Module, config: SparsityConfig, thresholds: list[float] | None = None) -> list[Sparsifier]:
    """Install the sparsifiers that `config` requests; magnitude needs the calibrated thresholds."""
    return install(model, config.site, config.method, config.target, thresholds)


def install_for_training(model: nn.Module, config: SparsityConfig) -> list[Sparsifier]:
    """Install what training needs: top-k zeros for `topk`, else pass-through sparsifiers that mark the site.

    magnitude trains without zeros, because its thresholds are calibrated after training.
    At ssm_state the penalty reads the returned states, so nothing is installed there
    unless top-k enforces zeros.
    """
    if config.method == "topk":
        return install(model, config.site, "topk", config.target)
    if config.site == "ssm_state":
        remove(model)
        return []
    return install(model, config.site, "none")


@contextmanager
def record_sites(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the output of every Sparsifier in `model`, in call order, while the block runs.

    Call order is layer order. The tensors keep their autograd graph, so a penalty on them
    trains the model. The list stays empty when the model has no sparsifier.
    """
    recorded: list[Tensor] = []
    handles = [module.register_forward_hook(lambda _module, _inputs, output: recorded.append(output))
               for module in model.modules() if isinstance(module, Sparsifier)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def magnitude_threshold(values: Tensor, target: float) -> float:
    """Return the threshold t such that a `target` share of `values` has |v| <= t.

    t is the k-th smallest |v| with k = round(target * n), so on `values` themselves
    exactly k values are <= t when no two |v| tie. target 0 returns -1, which zeroes
    nothing, because |v| >= 0 > -1.
    """
    flat = values.detach().abs().flatten().float()
    if flat.numel() == 0:
        raise ValueError("magnitude_threshold needs at least one value")
    k = round(target * flat.numel())
    if k == 0:
        return -1.0
    return flat.kthvalue(k).values.item()


def calibrate_thresholds(per_layer_values: list[list[Tensor]], target: float) -> list[float]:
    """Return one magnitude threshold per layer from the site values each layer produced."""
    return [magnitude_threshold(torch.cat([v.flatten() for v in chunks]), target) for chunks in per_layer_values]


def subsample(values: Tensor, max_values: int) -> Tensor:
    """Return every n-th value of `values` flattened, at most about `max_values` of them."""
    flat = values.detach().flatten()
    stride = max(1, math.ceil(flat.numel() / max_values))
    return flat[::stride].clone()
