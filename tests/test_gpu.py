"""GPU paths against the float64 reference: mamba-ssm's fused kernels and our scan on CUDA tensors.

Skipped without a CUDA device; the fused-kernel tests also need `pip install '.[cuda]'`.
benchmarks/gpu_check.sh runs this file on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from samba.model import MambaConfig, build_model
from samba.model.backend import cuda_kernels_error, use_backend
from samba.model.scan import selective_scan, selective_scan_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_mamba_ssm = pytest.mark.skipif(cuda_kernels_error() is not None,
                                     reason=f"mamba-ssm kernels do not import: {cuda_kernels_error()}")
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D")


def make_inputs(batch: int, length: int, d_inner: int = 64, d_state: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "u": torch.randn(batch, length, d_inner, generator=generator, dtype=torch.float64),
        "delta": torch.nn.functional.softplus(torch.randn(batch, length, d_inner, generator=generator,
                                                          dtype=torch.float64) - 2),
        "A": -torch.exp(torch.randn(d_inner, d_state, generator=generator, dtype=torch.float64)),
        "B": torch.randn(batch, length, d_state, generator=generator, dtype=torch.float64),
        "C": torch.randn(batch, length, d_state, generator=generator, dtype=torch.float64),
        "D": torch.randn(d_inner, generator=generator, dtype=torch.float64),
    }


def gradients_on(device: str, dtype: torch.dtype, inputs: dict, backend: str, return_states: bool):
    leaves = {name: tensor.to(device, dtype).requires_grad_() for name, tensor in inputs.items()}
    weight = torch.linspace(-1, 1, inputs["u"].numel(), dtype=dtype, device=device).view_as(leaves["u"])
    with use_backend(backend):
        out = selective_scan(**leaves, return_states=return_states)
    loss = (out.y * weight).sum() + (out.states.sum() if return_states else 0)
    grads = torch.autograd.grad(loss, [leaves[name] for name in INPUT_NAMES])
    return out, grads


def reference_gradients(inputs: dict, return_states: bool):
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
    y, states, last_state = selective_scan_reference(**leaves)
    weight = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * weight).sum() + (states.sum() if return_states else 0)
    grads = torch.autograd.grad(loss, [leaves[name] for name in INPUT_NAMES])
    return (y.detach(), states.detach(), last_state.detach()), grads


@needs_mamba_ssm
@pytest.mark.parametrize("length", [1, 33, 257, 1000])
def test_fused_scan_matches_reference(length: int) -> None:
    inputs = make_inputs(2, length)
    (y_ref, _, last_ref), grads_ref = reference_gradients(inputs, return_states=False)
    out, grads = gradients_on("cuda", torch.float32, inputs, "cuda", return_states=False)
    torch.testing.assert_close(out.y.double().cpu(), y_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.last_state.double().cpu(), last_ref, rtol=1e-3, atol=1e-3)
    for name, grad, grad_ref in zip(INPUT_NAMES, grads, grads_ref):
        scale = grad_ref.abs().max().item()
        torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=1e-3, atol=1e-3 * scale, msg=name)


@pytest.mark.parametrize("length", [1, 33, 257])
def test_torch_scan_on_cuda_matches_reference(length: int) -> None:
    # The path Samba takes on a GPU, because the fused scan does not return every state.
    inputs = make_inputs(2, length)
    (y_ref, states_ref, _), grads_ref = reference_gradients(inputs, return_states=True)
    out, grads = gradients_on("cuda", torch.float64, inputs, "auto", return_states=True)
    torch.testing.assert_close(out.y.cpu(), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.states.cpu(), states_ref, rtol=1e-10, atol=1e-10)
    for name, grad, grad_ref in zip(INPUT_NAMES, grads, grads_ref):
        torch.testing.assert_close(grad.cpu(), grad_ref, rtol=1e-9, atol=1e-9, msg=name)


@needs_mamba_ssm
@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_model_on_cuda_matches_torch_backend(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind, MambaConfig(vocab_size=100, d_model=64, n_layers=2)).cuda()
    ids = torch.randint(0, 100, (2, 128), device="cuda")
    grads = {}
    for backend in ("cuda", "torch"):
        model.zero_grad()
        with use_backend(backend):
            output = model(ids)
        output.logits.float().square().mean().backward()
        grads[backend] = [param.grad.clone() for param in model.parameters()]
        if backend == "cuda":
            logits = output.logits.detach()
        else:
            torch.testing.assert_close(logits, output.logits.detach(), rtol=1e-3, atol=1e-3)
    for grad_cuda, grad_torch in zip(grads["cuda"], grads["torch"]):
        torch.testing.assert_close(grad_cuda, grad_torch, rtol=1e-2, atol=1e-4 * grad_torch.abs().max().item() + 1e-6)


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_step_matches_forward_on_cuda(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind, MambaConfig(vocab_size=100, d_model=32, n_layers=2)).cuda().double().eval()
    ids = torch.randint(0, 100, (2, 10), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        model(ids[:, :3], cache=cache)
        for t in range(3, 10):
            out = model.step(ids[:, t], cache)
            torch.testing.assert_close(out.logits, full.logits[:, t], rtol=1e-10, atol=1e-10)
