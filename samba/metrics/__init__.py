"""Evaluation metrics: perplexity and accuracy, state sparsity, active-parameter fraction."""

from samba.metrics.active_params import active_parameter_fraction
from samba.metrics.perplexity import NextTokenAccumulator
from samba.metrics.sparsity import (
    SparsityAccumulator,
    exact_zero_fraction,
    hoyer,
    near_zero_fraction_absolute,
    near_zero_fraction_relative,
)

__all__ = [
    "NextTokenAccumulator",
    "SparsityAccumulator",
    "active_parameter_fraction",
    "exact_zero_fraction",
    "hoyer",
    "near_zero_fraction_absolute",
    "near_zero_fraction_relative",
]
