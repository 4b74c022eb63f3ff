"""The selective scan against its float64 sequential reference and a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from samba.model.scan import selective_scan, selective_scan_reference

D_INNER = 5
D_STATE = 3


def make_inputs(batch: int, length: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random scan inputs in the ranges the model produces: delta > 0 and A < 0."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    inputs = {
        "u": randn(batch, length, D_INNER),
        "delta": torch.nn.functional.softplus(randn(batch, length, D_INNER)),
        "A": -torch.exp(randn(D_INNER, D_STATE)),
        "B": randn(batch, length, D_STATE),
        "C": randn(batch, length, D_STATE),
        "D": randn(D_INNER),
    }
    return {name: tensor.to(dtype).requires_grad_() for name, tensor in inputs.items()}


INPUT_NAMES = ("u", "delta", "A", "B", "C", "D")
CASES = [(batch, length) for batch in (1, 3) for length in (1, 2, 3, 17, 64)]


@pytest.mark.parametrize(("batch", "length"), CASES)
def test_scan_matches_reference_forward(batch: int, length: int) -> None:
    inputs = make_inputs(batch, length)
    y_ref, states_ref, last_ref = selective_scan_reference(**inputs)
    out = selective_scan(**inputs, return_states=True)

    assert out.y.shape == (batch, length, D_INNER)
    assert out.states.shape == (batch, length, D_INNER, D_STATE)
    assert out.last_state.shape == (batch, D_INNER, D_STATE)
    torch.testing.assert_close(out.y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.states, states_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.last_state, last_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("batch", "length"), CASES)
def test_scan_matches_reference_gradients(batch: int, length: int) -> None:
    inputs = make_inputs(batch, length)
    # Random cotangents on all three outputs, so every path into the gradients is used.
    generator = torch.Generator().manual_seed(1)
    weight_y = torch.randn(batch, length, D_INNER, generator=generator, dtype=torch.float64)
    weight_states = torch.randn(batch, length, D_INNER, D_STATE, generator=generator, dtype=torch.float64)
    weight_last = torch.randn(batch, D_INNER, D_STATE, generator=generator, dtype=torch.float64)
    tensors = [inputs[name] for name in INPUT_NAMES]

    y_ref, states_ref, last_ref = selective_scan_reference(**inputs)
    objective_ref = (y_ref * weight_y).sum() + (states_ref * weight_states).sum() + (last_ref * weight_last).sum()
    grads_ref = torch.autograd.grad(objective_ref, tensors)

    out = selective_scan(**inputs, return_states=True)
    objective = (out.y * weight_y).sum() + (out.states * weight_states).sum() + (out.last_state * weight_last).sum()
    grads = torch.autograd.grad(objective, tensors)

    for name, grad, grad_ref in zip(INPUT_NAMES, grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10, msg=f"gradient w.r.t. {name}")


def test_reference_single_step_closed_form() -> None:
    # One channel, two state indices, length 1, h0 given:
    # h = exp(delta * A) * h0 + delta * B * u and y = C . h + D * u.
    u, delta, D = 0.7, 0.3, 1.5
    A = [-1.0, -2.0]
    B = [0.4, -1.1]
    C = [2.0, 0.5]
    h0 = [0.25, -0.5]
    expected_h = [math.exp(delta * A[n]) * h0[n] + delta * B[n] * u for n in range(2)]
    expected_y = C[0] * expected_h[0] + C[1] * expected_h[1] + D * u

    f64 = torch.float64
    y, states, last_state = selective_scan_reference(
        torch.tensor([[[u]]], dtype=f64),
        torch.tensor([[[delta]]], dtype=f64),
        torch.tensor([A], dtype=f64),
        torch.tensor([[B]], dtype=f64),
        torch.tensor([[C]], dtype=f64),
        torch.tensor([D], dtype=f64),
        h0=torch.tensor([[h0]], dtype=f64),
    )
    assert y.item() == pytest.approx(expected_y, rel=1e-14)
    assert states[0, 0, 0].tolist() == pytest.approx(expected_h, rel=1e-14)
    assert last_state[0, 0].tolist() == pytest.approx(expected_h, rel=1e-14)

    out = selective_scan(
        torch.tensor([[[u]]], dtype=f64),
        torch.tensor([[[delta]]], dtype=f64),
        torch.tensor([A], dtype=f64),
        torch.tensor([[B]], dtype=f64),
        torch.tensor([[C]], dtype=f64),
        torch.tensor([D], dtype=f64),
        h0=torch.tensor([[h0]], dtype=f64),
    )
    assert out.y.item() == pytest.approx(expected_y, rel=1e-14)
    assert out.states is None


def test_scan_continues_from_h0() -> None:
    inputs = make_inputs(batch=2, length=20)
    full = selective_scan(**inputs, return_states=True)
    split = 8
    first = selective_scan(**{name: t[:, :split] if t.ndim == 3 else t for name, t in inputs.items()})
    second = selective_scan(
        **{name: t[:, split:] if t.ndim == 3 else t for name, t in inputs.items()},
        h0=first.last_state,
        return_states=True,
    )
    torch.testing.assert_close(second.y, full.y[:, split:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second.states, full.states[:, split:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second.last_state, full.last_state, rtol=1e-12, atol=1e-12)


def test_scan_upcasts_bfloat16() -> None:
    inputs = make_inputs(batch=2, length=33, seed=3)
    y_ref, states_ref, _ = selective_scan_reference(**inputs)
    low = {name: t.detach().to(torch.bfloat16) for name, t in inputs.items()}
    out = selective_scan(**low, return_states=True)

    assert out.y.dtype == torch.bfloat16
    assert out.states.dtype == torch.float32
    assert out.last_state.dtype == torch.float32
    # bfloat16 inputs carry about 3 significant digits, so compare loosely.
    torch.testing.assert_close(out.y.double(), y_ref.detach(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.states.double(), states_ref.detach(), rtol=0.05, atol=0.05)


def test_scan_rejects_mismatched_shapes() -> None:
    inputs = make_inputs(batch=2, length=4)
    inputs["B"] = inputs["B"][:, :3]
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**inputs)
