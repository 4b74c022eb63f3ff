"""Sparse activations: which tensor is sparsified (the site), how (top-k, magnitude), and sparse matmuls.

samba.sparsity imports nothing from samba.model, so the model modules can import it.
"""

from samba.sparsity.config import METHODS, PENALTIES, SITES, SparsityConfig
from samba.sparsity.sparse_linear import SparseInputLinear, site_input_linears, sparse_input_linears
from samba.sparsity.sparsifier import (
    SITE_TOKEN_DIMS,
    Sparsifier,
    calibrate_thresholds,
    install,
    install_config,
    install_for_training,
    magnitude_threshold,
    record_sites,
    remove,
    topk_keep_count,
)

__all__ = [
    "METHODS",
    "PENALTIES",
    "SITES",
    "SITE_TOKEN_DIMS",
    "Sparsifier",
    "SparseInputLinear",
    "SparsityConfig",
    "calibrate_thresholds",
    "install",
    "install_config",
    "install_for_training",
    "magnitude_threshold",
    "record_sites",
    "remove",
    "site_input_linears",
    "sparse_input_linears",
    "topk_keep_count",
]
