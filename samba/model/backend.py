"""The one place that chooses how the selective scan and the causal convolution run.

Backends:
    auto   (default) the fastest available for each tensor's device: mamba-ssm's fused
           CUDA kernels on CUDA tensors when they import, our compiled C kernel on CPU
           tensors when it builds, else the pure-PyTorch chunked scan. Each fallback logs
           one warning with the command that installs the faster path.
    torch  the pure-PyTorch chunked scan on every device (no compiled code at all).
    cpu    our C kernel (samba/model/kernels); raises BackendError when it cannot be built
           or the tensors are not on the CPU.
    cuda   mamba-ssm and causal-conv1d (`pip install '.[cuda]'`); raises BackendError when
           they do not import or the tensors are not on a CUDA device.

The fused CUDA scan neither starts from a given state nor returns the state of every
position. A scan that needs either (Samba's states, prefill from a cache) therefore runs
the pure-PyTorch chunked scan on the CUDA tensors, under `auto` and `cuda` alike.

Set the backend with `set_backend`, the context manager `use_backend`, or the environment
variable SAMBA_BACKEND, which is read when no backend has been set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from torch import Tensor

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "cpu", "cuda"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "cpu", "cuda")
CUDA_INSTALL_HINT = "install them with `pip install '.[cuda]'` (mamba-ssm and causal-conv1d, built for your CUDA)"


class BackendError(RuntimeError):
    """The requested scan backend cannot run here."""


def _validated(name: str, source: str) -> Backend:
    if name not in BACKENDS:
        raise BackendError(f"invalid scan backend {name!r} in {source}: expected one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


_backend: Backend | None = None
_warned: set[str] = set()
_cuda_error: str | None = None
_cuda_checked = False


def get_backend() -> Backend:
    """Return the backend set by set_backend, else the one SAMBA_BACKEND names, else "auto"."""
    if _backend is not None:
        return _backend
    return _validated(os.environ.get("SAMBA_BACKEND", "auto"), "the environment variable SAMBA_BACKEND")


def set_backend(name: str | None) -> None:
    """Choose the backend for every scan and convolution in this process; None returns to SAMBA_BACKEND."""
    global _backend
    _backend = None if name is None else _validated(name, "set_backend")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the body with another backend, then restore the previous setting."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def cuda_kernels_error() -> str | None:
    """Return why mamba-ssm's kernels cannot be imported, or None when they can."""
    global _cuda_error, _cuda_checked
    if not _cuda_checked:
        try:
            import causal_conv1d  # noqa: F401
            import mamba_ssm.ops.selective_scan_interface  # noqa: F401
        except Exception as error:  # noqa: BLE001 - a broken CUDA build raises more than ImportError
            _cuda_error = f"{type(error).__name__}: {error}"
        _cuda_checked = True
    return _cuda_error


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _cpu_kernel_error() -> str | None:
    from samba.model.scan_cpu import cpu_kernel_error

    return cpu_kernel_error()


def kernel_for(tensor: Tensor) -> Literal["torch", "cpu", "cuda"]:
    """Return the implementation that runs on `tensor`'s device under the current backend.

    Raises BackendError when the backend `cpu` or `cuda` cannot run on this tensor.
    """
    backend = get_backend()
    device = tensor.device.type
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        error = cuda_kernels_error()
        if error is not None:
            raise BackendError(f"scan backend 'cuda' needs mamba-ssm and causal-conv1d, which failed to import "
                               f"({error}); {CUDA_INSTALL_HINT}, or use 'auto'")
        if device != "cuda":
            raise BackendError(f"scan backend 'cuda' needs CUDA tensors, got tensors on {device}; use 'auto' or 'torch'")
        return "cuda"
    if backend == "cpu":
        error = _cpu_kernel_error()
        if error is not None:
            raise BackendError(f"scan backend 'cpu' is unavailable: {error}; use 'auto' or 'torch'")
        if device != "cpu":
            raise BackendError(f"scan backend 'cpu' needs CPU tensors, got tensors on {device}; use 'auto' or 'torch'")
        return "cpu"

    # auto
    if device == "cuda":
        error = cuda_kernels_error()
        if error is None:
            return "cuda"
        _warn_once("cuda", f"mamba-ssm's fused CUDA kernels are not available ({error}); the scan runs in "
                           f"pure PyTorch on the GPU, which is slower: {CUDA_INSTALL_HINT}")
        return "torch"
    if device == "cpu":
        error = _cpu_kernel_error()
        if error is None:
            return "cpu"
        _warn_once("cpu", f"the compiled CPU scan kernel is not available ({error}); the scan runs in pure "
                          "PyTorch, which is several times slower: install a C compiler (gcc or clang)")
        return "torch"
    return "torch"
