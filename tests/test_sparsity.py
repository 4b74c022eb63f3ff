"""Sparsity measures and the active-parameter fraction against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from samba.metrics.active_params import active_parameter_fraction
from samba.metrics.sparsity import (
    SparsityAccumulator,
    exact_zero_fraction,
    hoyer,
    near_zero_fraction_absolute,
    near_zero_fraction_relative,
)


def _states(seed: int, shape: tuple[int, ...] = (2, 5, 6, 4), zero_fraction: float = 0.4) -> torch.Tensor:
    """Random float32 states with about `zero_fraction` exact zeros and spread-out magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator).pow(4)
    keep = torch.rand(shape, generator=generator) >= zero_fraction
    return values * keep


def test_exact_zero_fraction_k_of_n() -> None:
    for k in range(0, 9):
        h = torch.ones(1, 1, 2, 4, dtype=torch.float64)
        h.view(-1)[:k] = 0.0
        assert exact_zero_fraction(h) == k / 8


def test_exact_zero_counts_negative_zero() -> None:
    assert exact_zero_fraction(torch.tensor([-0.0, 0.0, 1.0, -2.0])) == 0.5


def test_absolute_threshold_inclusive() -> None:
    h = torch.tensor([0.0, 5e-4, -1e-3, 2e-3, 1.0], dtype=torch.float64)

    assert near_zero_fraction_absolute(h) == 3 / 5
    assert near_zero_fraction_absolute(h, threshold=0.0) == 1 / 5


def test_relative_threshold_closed_form() -> None:
    # One token vector [3, 4, 0, 0]: RMS = sqrt(25 / 4) = 2.5.
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64).reshape(1, 2, 2)

    assert near_zero_fraction_relative(h, 0.5) == 0.5  # |h| <= 1.25: the two zeros
    assert near_zero_fraction_relative(h, 1.2) == 0.75  # |h| <= 3.0: zeros and 3
    assert near_zero_fraction_relative(h, 1.6) == 1.0  # |h| <= 4.0: all


def test_relative_threshold_per_token() -> None:
    # Token A = [1, 0.001], RMS about 0.707. Token B = [1000, 1], RMS about 707.
    h = torch.tensor([[1.0, 0.001], [1000.0, 1.0]], dtype=torch.float64)

    assert near_zero_fraction_relative(h, 0.01, token_dims=1) == 0.5  # 0.001 in A and 1 in B
    assert near_zero_fraction_absolute(h, 1e-3) == 0.25  # only 0.001


def test_all_zero_token_counts_as_near_zero() -> None:
    h = torch.zeros(3, 2, 4)

    assert near_zero_fraction_relative(h, 0.01) == 1.0
    assert hoyer(h) == 1.0


def test_hoyer_closed_forms() -> None:
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 2, 1] = -3.0
    constant = torch.full((1, 4, 4), 0.5)
    two_equal = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)

    assert hoyer(one_hot) == pytest.approx(1.0, abs=1e-15)
    assert hoyer(constant) == pytest.approx(0.0, abs=1e-15)
    # n = 4, L1 = 2, L2 = sqrt(2): (2 - sqrt(2)) / (2 - 1).
    assert hoyer(two_equal, token_dims=1) == pytest.approx(2 - math.sqrt(2), rel=1e-15)


def test_hoyer_averages_tokens() -> None:
    h = torch.stack([torch.tensor([0.0, 0.0, 5.0, 0.0]), torch.ones(4)])  # 1.0 and 0.0

    assert hoyer(h, token_dims=1) == pytest.approx(0.5, abs=1e-15)


def test_hoyer_needs_two_values() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        hoyer(torch.ones(3, 1), token_dims=1)


def test_token_dims_flat_equals_state_layout() -> None:
    h = _states(0)
    flat = h.reshape(2, 5, 24)

    assert near_zero_fraction_relative(h, 0.1) == near_zero_fraction_relative(flat, 0.1, token_dims=1)
    assert hoyer(h) == hoyer(flat, token_dims=1)


def test_token_dims_grouping_matters() -> None:
    # Treating single rows of d_state values as tokens gives another RMS, so another result.
    h = _states(1)

    assert near_zero_fraction_relative(h, 0.3) != near_zero_fraction_relative(h, 0.3, token_dims=1)


def test_empty_states_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        exact_zero_fraction(torch.zeros(0, 4, 4))


@pytest.mark.parametrize("scale", [2.0**-20, 1e-3, 7.0, 1e4, -2.0])
def test_scale_invariance(scale: float) -> None:
    h = _states(2).to(torch.float64)
    scaled = h * scale

    assert exact_zero_fraction(scaled) == exact_zero_fraction(h)
    assert near_zero_fraction_relative(scaled, 0.05) == near_zero_fraction_relative(h, 0.05)
    assert hoyer(scaled) == pytest.approx(hoyer(h), rel=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_absolute_fraction_changes_with_scale(scale: float) -> None:
    h = _states(3).to(torch.float64)

    before = near_zero_fraction_absolute(h)
    after = near_zero_fraction_absolute(h * scale)

    assert after != before
    assert (after > before) == (scale < 1)


def test_accumulator_equals_concatenation() -> None:
    layers, batches = 3, 4
    states = [[_states(10 * layer + batch, shape=(2, 7, 6, 4)) for layer in range(layers)] for batch in range(batches)]
    accumulator = SparsityAccumulator(layers, relative_threshold=0.05, absolute_threshold=1e-2)
    for batch in states:
        accumulator.update(batch)
    result = accumulator.result()

    assert len(result["layers"]) == layers
    for layer in range(layers):
        whole = torch.cat([batch[layer] for batch in states])  # (8, 7, 6, 4)
        measured = result["layers"][layer]
        assert measured["exact_zero_fraction"] == exact_zero_fraction(whole)
        assert measured["near_zero_fraction_relative"] == near_zero_fraction_relative(whole, 0.05)
        assert measured["near_zero_fraction_absolute"] == near_zero_fraction_absolute(whole, 1e-2)
        assert measured["hoyer"] == pytest.approx(hoyer(whole), rel=1e-12)
        # Per-token sums of float32 states run in float32: mean |h| is exact to float32 rounding.
        assert measured["mean_abs"] == pytest.approx(whole.double().abs().mean().item(), rel=1e-6)
        assert measured["nonzero_per_token"] == torch.count_nonzero(whole).item() / (8 * 7)
        assert measured["features_per_token"] == 24

    everything = torch.stack([torch.cat([batch[layer] for batch in states]) for layer in range(layers)])
    overall = result["overall"]
    assert overall["exact_zero_fraction"] == exact_zero_fraction(everything)
    assert overall["near_zero_fraction_relative"] == near_zero_fraction_relative(everything, 0.05)
    assert overall["near_zero_fraction_absolute"] == near_zero_fraction_absolute(everything, 1e-2)
    assert overall["hoyer"] == pytest.approx(hoyer(everything), rel=1e-12)
    assert overall["mean_abs"] == pytest.approx(everything.double().abs().mean().item(), rel=1e-6)
    assert overall["nonzero_per_token"] == torch.count_nonzero(everything).item() / (layers * 8 * 7)


def test_accumulator_weighs_values_not_batches() -> None:
    # A batch of 1 all-zero token and a batch of 3 dense tokens: 1/4 of the values are zero,
    # where a mean of per-batch fractions would give 1/2.
    accumulator = SparsityAccumulator(1, relative_threshold=0.01)
    accumulator.update([torch.zeros(1, 1, 2, 2)])
    accumulator.update([torch.ones(1, 3, 2, 2)])

    result = accumulator.result()["overall"]
    assert result["exact_zero_fraction"] == 0.25
    assert result["hoyer"] == 0.25
    assert result["nonzero_per_token"] == 3.0


def test_accumulator_rejects_wrong_input() -> None:
    accumulator = SparsityAccumulator(2, relative_threshold=0.01)
    with pytest.raises(ValueError, match="no states"):
        accumulator.result()
    with pytest.raises(ValueError, match="2 layers"):
        accumulator.update([torch.ones(1, 2, 3, 4)])
    accumulator.update([torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4)])
    with pytest.raises(ValueError, match="changed size"):
        accumulator.update([torch.ones(1, 2, 3, 5), torch.ones(1, 2, 3, 5)])


def test_accumulator_rejects_bad_thresholds() -> None:
    with pytest.raises(ValueError, match="relative_threshold"):
        SparsityAccumulator(1, relative_threshold=-0.1)
    with pytest.raises(ValueError, match="absolute_threshold"):
        SparsityAccumulator(1, relative_threshold=0.1, absolute_threshold=float("nan"))


def test_active_parameters_closed_form() -> None:
    result = active_parameter_fraction(1000, (10, 40), nonzero_features_per_token=10)

    assert result["total"] == 1000
    assert result["active"] == 1000 - 10 * 30
    assert result["active_fraction"] == pytest.approx(0.7)
    assert result["reduction"] == pytest.approx(0.3)
    assert result["readout_input_active_fraction"] == 0.25


def test_active_parameters_dense_and_empty_features() -> None:
    dense = active_parameter_fraction(500, (4, 25), nonzero_features_per_token=25)
    silent = active_parameter_fraction(500, (4, 25), nonzero_features_per_token=0)

    assert dense["active"] == 500
    assert dense["reduction"] == 0.0
    assert silent["active"] == 400


def test_active_parameters_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="between 0 and 40"):
        active_parameter_fraction(1000, (10, 40), nonzero_features_per_token=41)
    with pytest.raises(ValueError, match="smaller than the readout input weight"):
        active_parameter_fraction(100, (10, 40), nonzero_features_per_token=1)


def test_absolute_threshold_compares_exactly_float32():
    # float32(1e-3) is 0.0010000000475, above the threshold 1e-3, so it is not near zero.
    h = torch.tensor([1e-3, 9e-4], dtype=torch.float32)
    assert near_zero_fraction_absolute(h, 1e-3) == 0.5
