"""Loss terms against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from samba.loss import compute_loss, pruning_loss
from samba.model import LMOutput

# One sequence of two positions over a vocabulary of three tokens.
LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
READOUT_LOGITS = [[0.2, 0.1, -0.3], [2.0, 2.0, 1.0]]
TARGETS = [1, 0]
# Two layers of states: (batch=1, length=2, d_inner=1, d_state=2) and (1, 2, 2, 1).
STATES_LAYER_0 = [[[[0.5, -1.0]], [[0.0, 2.0]]]]
STATES_LAYER_1 = [[[[-3.0], [0.25]], [[1.0], [0.0]]]]


def cross_entropy_by_hand(logits: list[list[float]], targets: list[int]) -> float:
    """Mean over positions of -log softmax(logits)[target] = log(sum_k exp(l_k)) - l_target."""
    losses = [math.log(sum(math.exp(value) for value in row)) - row[target] for row, target in zip(logits, targets)]
    return sum(losses) / len(losses)


def samba_output() -> LMOutput:
    f64 = torch.float64
    return LMOutput(
        logits=torch.tensor([LOGITS], dtype=f64),
        states=[torch.tensor(STATES_LAYER_0, dtype=f64), torch.tensor(STATES_LAYER_1, dtype=f64)],
        readout_logits=torch.tensor([READOUT_LOGITS], dtype=f64),
    )


def test_pruning_loss_by_hand() -> None:
    output = samba_output()
    # |h| summed: layer 0 is 0.5 + 1 + 0 + 2 = 3.5, layer 1 is 3 + 0.25 + 1 + 0 = 4.25, over 8 elements.
    assert pruning_loss(output.states).item() == pytest.approx((3.5 + 4.25) / 8, rel=1e-12)


def test_pruning_loss_weights_every_element_equally() -> None:
    # A mean of per-layer means would give (1 + 0) / 2 = 0.5. One element in nine is 1 here.
    states = [torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 2, 4)]
    assert pruning_loss(states).item() == pytest.approx(1 / 9)


def test_pruning_loss_rejects_empty_list() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        pruning_loss([])


def test_samba_loss_by_hand() -> None:
    parts = compute_loss(samba_output(), torch.tensor([TARGETS]), readout_weight=0.5, pruning_weight=0.1)
    main = cross_entropy_by_hand(LOGITS, TARGETS)
    readout = cross_entropy_by_hand(READOUT_LOGITS, TARGETS)
    pruning = (3.5 + 4.25) / 8

    assert parts.main.item() == pytest.approx(main, rel=1e-12)
    assert parts.readout.item() == pytest.approx(readout, rel=1e-12)
    assert parts.pruning.item() == pytest.approx(pruning, rel=1e-12)
    assert parts.total.item() == pytest.approx(main + 0.5 * readout + 0.1 * pruning, rel=1e-12)


def test_loss_weights_change_total() -> None:
    main = cross_entropy_by_hand(LOGITS, TARGETS)
    readout = cross_entropy_by_hand(READOUT_LOGITS, TARGETS)
    pruning = (3.5 + 4.25) / 8
    parts = compute_loss(samba_output(), torch.tensor([TARGETS]), readout_weight=2.0, pruning_weight=3.0)
    assert parts.total.item() == pytest.approx(main + 2.0 * readout + 3.0 * pruning, rel=1e-12)
    parts = compute_loss(samba_output(), torch.tensor([TARGETS]), readout_weight=0.0, pruning_weight=0.0)
    assert parts.total.item() == pytest.approx(main, rel=1e-12)


def test_baseline_total_is_main() -> None:
    output = LMOutput(logits=torch.tensor([LOGITS], dtype=torch.float64))
    parts = compute_loss(output, torch.tensor([TARGETS]))
    assert parts.readout is None
    assert parts.pruning is None
    assert parts.main.item() == pytest.approx(cross_entropy_by_hand(LOGITS, TARGETS), rel=1e-12)
    assert torch.equal(parts.total, parts.main)


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf])
@pytest.mark.parametrize("name", ["readout_weight", "pruning_weight"])
def test_invalid_weight_rejected(name: str, weight: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        compute_loss(samba_output(), torch.tensor([TARGETS]), **{name: weight})


def test_targets_shape_checked() -> None:
    with pytest.raises(ValueError, match="targets must have shape"):
        compute_loss(samba_output(), torch.tensor(TARGETS))
