"""The scan backend switch: choice per device, fallbacks with one warning, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from samba.model import backend, scan_cpu
from samba.model.backend import BackendError, cuda_kernels_error, kernel_for, use_backend
from samba.model.scan import selective_scan, selective_scan_reference

needs_cpu_kernel = pytest.mark.skipif(scan_cpu.cpu_kernel_error() is not None,
                                      reason=f"the C scan kernel cannot be built here: {scan_cpu.cpu_kernel_error()}")
without_mamba_ssm = pytest.mark.skipif(cuda_kernels_error() is None, reason="mamba-ssm is installed here")


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path: Path):
    """Forget the compiled kernels and warnings, and build into an empty cache folder."""
    monkeypatch.setattr(scan_cpu, "_libraries", {})
    monkeypatch.setattr(scan_cpu, "_build_error", None)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setenv("SAMBA_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


@pytest.fixture
def broken_compiler(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-samba")


def small_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "u": torch.randn(2, 9, 4, generator=generator),
        "delta": torch.rand(2, 9, 4, generator=generator),
        "A": -torch.rand(4, 3, generator=generator) - 0.5,
        "B": torch.randn(2, 9, 3, generator=generator),
        "C": torch.randn(2, 9, 3, generator=generator),
        "D": torch.randn(4, generator=generator),
    }


def test_invalid_backend_name() -> None:
    with pytest.raises(BackendError, match="invalid scan backend 'fast'.*auto, torch, cpu, cuda"):
        backend.set_backend("fast")


def test_invalid_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv("SAMBA_BACKEND", "gpu")
    with pytest.raises(BackendError, match="SAMBA_BACKEND"):
        kernel_for(torch.zeros(1))


def test_environment_variable_chooses_backend(monkeypatch) -> None:
    monkeypatch.setenv("SAMBA_BACKEND", "torch")
    assert kernel_for(torch.zeros(1)) == "torch"


def test_use_backend_restores_setting() -> None:
    before = backend.get_backend()
    with use_backend("torch"):
        assert backend.get_backend() == "torch"
    assert backend.get_backend() == before


@needs_cpu_kernel
def test_auto_uses_cpu_kernel_on_cpu() -> None:
    with use_backend("auto"):
        assert kernel_for(torch.zeros(1)) == "cpu"


def test_kernel_builds_in_empty_cache(fresh_kernel_state: Path) -> None:
    if scan_cpu.shutil.which("cc") is None:
        pytest.skip("no C compiler `cc` on PATH")
    assert scan_cpu.cpu_kernel_error() is None
    assert len(list(fresh_kernel_state.glob("selective_scan_cpu_*.so"))) == 2


def test_auto_falls_back_with_one_warning(broken_compiler, caplog) -> None:
    inputs = small_inputs()
    y_ref, _, _ = selective_scan_reference(**{name: t.double() for name, t in inputs.items()})
    with use_backend("auto"), caplog.at_level(logging.WARNING, logger="samba.model.backend"):
        first = selective_scan(**inputs)
        second = selective_scan(**inputs)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no-such-compiler-samba" in warnings[0]
    assert "install a C compiler" in warnings[0]
    torch.testing.assert_close(first.y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(first.y, second.y)


def test_cpu_backend_without_kernel_is_an_error(broken_compiler) -> None:
    with use_backend("cpu"), pytest.raises(BackendError, match="scan backend 'cpu' is unavailable.*no C compiler"):
        selective_scan(**small_inputs())


@without_mamba_ssm
def test_cuda_backend_without_mamba_ssm_is_an_error() -> None:
    with use_backend("cuda"), pytest.raises(BackendError, match=r"mamba-ssm.*pip install '\.\[cuda\]'"):
        selective_scan(**small_inputs())


@pytest.mark.skipif(cuda_kernels_error() is not None, reason="mamba-ssm is not installed here")
def test_cuda_backend_rejects_cpu_tensors() -> None:
    with use_backend("cuda"), pytest.raises(BackendError, match="needs CUDA tensors"):
        selective_scan(**small_inputs())


@needs_cpu_kernel
def test_backends_agree_on_model_gradients() -> None:
    from samba.model import MambaConfig, build_model

    config = MambaConfig(vocab_size=30, d_model=16, n_layers=2, d_state=4)
    ids = torch.randint(0, 30, (2, 40), generator=torch.Generator().manual_seed(1))
    grads = {}
    for name in ("torch", "cpu"):
        torch.manual_seed(0)
        model = build_model("samba", config).double()
        with use_backend(name):
            output = model(ids)
        (output.logits.square().mean() + output.readout_logits.mean() + output.states[0].abs().mean()).backward()
        grads[name] = {key: param.grad for key, param in model.named_parameters()}
    for key, grad in grads["torch"].items():
        torch.testing.assert_close(grads["cpu"][key], grad, rtol=1e-10, atol=1e-12, msg=key)
