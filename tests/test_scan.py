"""Every selective-scan path against the float64 sequential reference and a closed form."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from samba.model.backend import use_backend
from samba.model.scan import selective_scan, selective_scan_reference
from samba.model.scan_cpu import CpuKernelScan, cpu_kernel_error, cpu_kernel_scan
from samba.model.scan_torch import ChunkedScan, chunked_scan

D_INNER = 5
D_STATE = 3
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "h0")
LENGTHS = (1, 2, 3, 5, 31, 33, 37, 63, 65, 100, 257, 1000)
CASES = [(batch, length) for batch in (1, 3) for length in LENGTHS]

needs_cpu_kernel = pytest.mark.skipif(cpu_kernel_error() is not None,
                                      reason=f"the C scan kernel cannot be built here: {cpu_kernel_error()}")


def _torch_path(chunk: int):
    def run(u, delta, A, B, C, D, h0, return_states):
        return chunked_scan(u, delta, A, B, C, D, h0, return_states, chunk=chunk)

    return run


# Each path takes (u, delta, A, B, C, D, h0, return_states) and returns (y, states, last_state).
PATHS = {
    "torch-chunk32": _torch_path(32),
    "torch-chunk4": _torch_path(4),
    "cpu-kernel": pytest.param(cpu_kernel_scan, marks=needs_cpu_kernel),
}


def make_inputs(batch: int, length: int, dtype: torch.dtype = torch.float64, seed: int = 0,
                d_inner: int = D_INNER, d_state: int = D_STATE) -> dict[str, torch.Tensor]:
    """Random scan inputs in the ranges the model produces: delta > 0 and A < 0, and a nonzero h0."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    inputs = {
        "u": randn(batch, length, d_inner),
        "delta": torch.nn.functional.softplus(randn(batch, length, d_inner)),
        "A": -torch.exp(randn(d_inner, d_state)),
        "B": randn(batch, length, d_state),
        "C": randn(batch, length, d_state),
        "D": randn(d_inner),
        "h0": randn(batch, d_inner, d_state),
    }
    return {name: tensor.to(dtype).requires_grad_() for name, tensor in inputs.items()}


def cotangents(batch: int, length: int, d_inner: int = D_INNER, d_state: int = D_STATE):
    """Random weights for y, states and last_state, so every path into the gradients is used."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, length, d_inner, generator=generator, dtype=torch.float64),
            torch.randn(batch, length, d_inner, d_state, generator=generator, dtype=torch.float64),
            torch.randn(batch, d_inner, d_state, generator=generator, dtype=torch.float64))


def objective(outputs, weights) -> torch.Tensor:
    return sum((output * weight).sum() for output, weight in zip(outputs, weights))


@functools.lru_cache(maxsize=None)
def reference_result(batch: int, length: int, d_inner: int = D_INNER, d_state: int = D_STATE):
    """The reference outputs and gradients of every input, computed once per case."""
    inputs = make_inputs(batch, length, d_inner=d_inner, d_state=d_state)
    outputs = selective_scan_reference(**inputs)
    weights = cotangents(batch, length, d_inner, d_state)
    grads = torch.autograd.grad(objective(outputs, weights), [inputs[name] for name in INPUT_NAMES])
    return tuple(output.detach() for output in outputs), grads


def check_against_reference(path, batch: int, length: int, d_inner: int = D_INNER, d_state: int = D_STATE) -> None:
    (y_ref, states_ref, last_ref), grads_ref = reference_result(batch, length, d_inner, d_state)
    inputs = make_inputs(batch, length, d_inner=d_inner, d_state=d_state)
    y, states, last_state = path(*(inputs[name] for name in INPUT_NAMES), True)

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10, msg="y")
    torch.testing.assert_close(states, states_ref, rtol=1e-10, atol=1e-10, msg="states")
    torch.testing.assert_close(last_state, last_ref, rtol=1e-10, atol=1e-10, msg="last_state")
    grads = torch.autograd.grad(objective((y, states, last_state), cotangents(batch, length, d_inner, d_state)),
                                [inputs[name] for name in INPUT_NAMES])
    for name, grad, grad_ref in zip(INPUT_NAMES, grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9, msg=f"gradient w.r.t. {name}")


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize(("batch", "length"), CASES)
def test_path_matches_reference(path, batch: int, length: int) -> None:
    check_against_reference(path, batch, length)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("length", (1, 33, 100))
@pytest.mark.parametrize("d_state", (3, 16))
def test_path_matches_reference_many_channels(path, length: int, d_state: int) -> None:
    # 70 channels: the C kernel splits them into a full block of 64 and a partial block of 6,
    # and each block into sub-blocks of 8 channels. d_state 16 runs the kernel's copy
    # specialised for that size, the model's default.
    check_against_reference(path, 2, length, d_inner=70, d_state=d_state)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_path_without_h0_or_states(path) -> None:
    inputs = make_inputs(2, 40)
    y_ref, _, last_ref = selective_scan_reference(**{**inputs, "h0": None})
    y, states, last_state = path(*(inputs[name] for name in INPUT_NAMES[:-1]), None, False)

    assert states is None
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last_state, last_ref, rtol=1e-10, atol=1e-10)
    # Only y carries a gradient here, the baseline model's case.
    weight = cotangents(2, 40)[0]
    grads_ref = torch.autograd.grad((y_ref * weight).sum(), [inputs[name] for name in INPUT_NAMES[:-1]])
    grads = torch.autograd.grad((y * weight).sum(), [inputs[name] for name in INPUT_NAMES[:-1]])
    for name, grad, grad_ref in zip(INPUT_NAMES, grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10, msg=f"gradient w.r.t. {name}")


def _gradcheck_inputs(batch: int = 2, length: int = 7, d_inner: int = 3, d_state: int = 2) -> tuple:
    inputs = make_inputs(batch, length, d_inner=d_inner, d_state=d_state, seed=5)
    return tuple(inputs[name] for name in INPUT_NAMES)


def test_chunked_scan_gradcheck() -> None:
    def function(*inputs):
        return ChunkedScan.apply(*inputs, True, 3)

    assert torch.autograd.gradcheck(function, _gradcheck_inputs())


@needs_cpu_kernel
def test_cpu_kernel_gradcheck() -> None:
    def function(*inputs):
        return CpuKernelScan.apply(*inputs, True)

    # 40 positions cross a checkpoint of the kernel (every 32 positions).
    assert torch.autograd.gradcheck(function, _gradcheck_inputs(length=40))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_long_sequence_stays_finite(backend: str) -> None:
    # delta at the top of its init range (dt_max = 0.1) and A down to -1000: the product of
    # all decays underflows to 0 many times over, which a closed form dividing by a
    # cumulative product of decays could not survive.
    batch, length, d_inner, d_state = 1, 8192, 2, 4
    generator = torch.Generator().manual_seed(7)
    u = torch.randn(batch, length, d_inner, generator=generator, dtype=torch.float64)
    delta = torch.full((batch, length, d_inner), 0.1, dtype=torch.float64)
    A = -torch.tensor([[1.0, 16.0, 100.0, 1000.0]] * d_inner, dtype=torch.float64)
    B = torch.randn(batch, length, d_state, generator=generator, dtype=torch.float64)
    C = torch.randn(batch, length, d_state, generator=generator, dtype=torch.float64)
    D = torch.ones(d_inner, dtype=torch.float64)
    y_ref, _, last_ref = selective_scan_reference(u, delta, A, B, C, D)

    low = [tensor.float().requires_grad_() for tensor in (u, delta, A, B, C, D)]
    with use_backend(backend):
        out = selective_scan(*low)
    out.y.sum().backward()
    assert torch.isfinite(out.y).all()
    assert all(torch.isfinite(tensor.grad).all() for tensor in low)
    torch.testing.assert_close(out.y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.last_state.double(), last_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_scan_is_causal(backend: str) -> None:
    inputs = {name: tensor.detach() for name, tensor in make_inputs(2, 70).items()}
    t = 40
    changed = dict(inputs)
    for name in ("u", "delta", "B", "C"):
        changed[name] = inputs[name].clone()
        changed[name][:, t + 1:] = torch.rand_like(inputs[name][:, t + 1:]) + 0.5
    with use_backend(backend):
        out = selective_scan(**inputs, return_states=True)
        out_changed = selective_scan(**changed, return_states=True)
        # The gradient of y_t reaches no later input.
        u = inputs["u"].clone().requires_grad_()
        y = selective_scan(**{**inputs, "u": u}).y
        (grad_u,) = torch.autograd.grad(y[:, t].sum(), u)
    assert torch.equal(out.y[:, :t + 1], out_changed.y[:, :t + 1])
    assert torch.equal(out.states[:, :t + 1], out_changed.states[:, :t + 1])
    assert not torch.equal(out.y[:, t + 1:], out_changed.y[:, t + 1:])
    assert (grad_u[:, t + 1:] == 0).all()
    assert (grad_u[:, t] != 0).any()


@needs_cpu_kernel
def test_cpu_kernel_is_independent_of_threads() -> None:
    inputs = make_inputs(3, 70, dtype=torch.float32, d_inner=70, d_state=16)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, states, last_state = cpu_kernel_scan(*(inputs[name] for name in INPUT_NAMES), True)
            grads = torch.autograd.grad(y.sum() + states.square().sum(), list(inputs.values()))
            results.append((y, states, last_state, *grads))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for tensor, tensor_other in zip(results[0], other):
            assert torch.equal(tensor, tensor_other)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("d_state", (3, 16))
def test_scan_float32_matches_reference(backend: str, d_state: int) -> None:
    # The float32 kernel computes exp with its own polynomial; this bounds its error.
    inputs = make_inputs(2, 65, d_inner=70, d_state=d_state)
    y_ref, states_ref, last_ref = selective_scan_reference(**inputs)
    low = {name: tensor.detach().float() for name, tensor in inputs.items()}
    with use_backend(backend):
        out = selective_scan(**low, return_states=True)
    assert out.y.dtype == out.states.dtype == out.last_state.dtype == torch.float32
    torch.testing.assert_close(out.y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.states.double(), states_ref.detach(), rtol=1e-5, atol=1e-5)


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
    args = (
        torch.tensor([[[u]]], dtype=f64),
        torch.tensor([[[delta]]], dtype=f64),
        torch.tensor([A], dtype=f64),
        torch.tensor([[B]], dtype=f64),
        torch.tensor([[C]], dtype=f64),
        torch.tensor([D], dtype=f64),
    )
    y, states, last_state = selective_scan_reference(*args, h0=torch.tensor([[h0]], dtype=f64))
    assert y.item() == pytest.approx(expected_y, rel=1e-14)
    assert states[0, 0, 0].tolist() == pytest.approx(expected_h, rel=1e-14)
    assert last_state[0, 0].tolist() == pytest.approx(expected_h, rel=1e-14)

    for backend in ("torch", "cpu") if cpu_kernel_error() is None else ("torch",):
        with use_backend(backend):
            out = selective_scan(*args, h0=torch.tensor([[h0]], dtype=f64))
        assert out.y.item() == pytest.approx(expected_y, rel=1e-14)
        assert out.states is None


def test_scan_continues_from_h0() -> None:
    inputs = make_inputs(batch=2, length=20)
    del inputs["h0"]
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
    del inputs["h0"]
    y_ref, states_ref, _ = selective_scan_reference(**inputs)
    low = {name: t.detach().to(torch.bfloat16) for name, t in inputs.items()}
    out = selective_scan(**low, return_states=True)

    assert out.y.dtype == torch.bfloat16
    assert out.states.dtype == torch.float32
    assert out.last_state.dtype == torch.float32
    # bfloat16 inputs carry about 3 significant digits, so compare loosely.
    torch.testing.assert_close(out.y.double(), y_ref.detach(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.states.double(), states_ref.detach(), rtol=0.05, atol=0.05)


def test_scan_ignores_autocast() -> None:
    inputs = {name: t.detach().float() for name, t in make_inputs(batch=2, length=33, seed=4).items()}
    plain = selective_scan(**inputs, return_states=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = selective_scan(**inputs, return_states=True)
    assert autocast.states.dtype == torch.float32
    torch.testing.assert_close(autocast.y, plain.y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(autocast.states, plain.states, rtol=1e-6, atol=1e-6)


def test_scan_rejects_mismatched_shapes() -> None:
    inputs = make_inputs(batch=2, length=4)
    inputs["B"] = inputs["B"][:, :3]
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**inputs)
