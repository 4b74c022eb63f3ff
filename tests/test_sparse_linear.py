"""Sparse-input matmuls for decode: equal to the dense product, and the dense fallback."""

from __future__ import annotations

import torch
from torch import nn

from samba.sparsity.sparse_linear import SparseInputLinear, sparse_input_matvec


def sparse_vector(features: int, zeros: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(features, generator=generator, dtype=torch.float64)
    x[torch.randperm(features, generator=generator)[:zeros]] = 0
    return x


def test_matvec_matches_dense_float64():
    weight = torch.randn(7, 40, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64)
    x = sparse_vector(40, 36)
    torch.testing.assert_close(sparse_input_matvec(x, weight.t().contiguous(), bias), weight @ x + bias)


def test_matvec_all_zero_input_returns_bias():
    weight = torch.randn(3, 5, dtype=torch.float64)
    bias = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(sparse_input_matvec(torch.zeros(5, dtype=torch.float64), weight.t().contiguous(), bias), bias)


def test_sparse_linear_matches_linear_on_both_paths():
    linear = nn.Linear(40, 6).double()
    layer = SparseInputLinear(linear, max_density=0.5)
    for zeros in (36, 4):  # 10% nonzero takes the sparse path, 90% the dense one.
        x = sparse_vector(40, zeros).reshape(1, 1, 40)
        torch.testing.assert_close(layer(x), linear(x))


def test_sparse_linear_batch_runs_dense():
    linear = nn.Linear(8, 3).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(SparseInputLinear(linear)(x), linear(x))
