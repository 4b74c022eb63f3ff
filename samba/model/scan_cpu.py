"""The selective scan as a compiled C kernel for CPU tensors (kernels/selective_scan_cpu.c).

The C file is compiled on first use with the system C compiler (`$CC`, else `cc`) into a
per-user cache folder, one shared library for float32 and one for float64, and called
through ctypes. It needs no Python or PyTorch headers, so a build takes about a second.
When no compiler is found or the build fails, `cpu_kernel_error()` returns the reason,
and the backend switch falls back to the pure-PyTorch scan.

Forward and backward are fused loops over (sequence, block of channels) work items, run
on `torch.get_num_threads()` threads. The forward pass saves the state at the start of
every chunk of `CHUNK` positions. The backward pass rebuilds one chunk of states at a time
from those checkpoints, so without `return_states` no (batch, length, d_inner, d_state)
tensor is ever allocated.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).resolve().parent / "kernels" / "selective_scan_cpu.c"
# Positions per checkpoint: the backward pass keeps 2 * CHUNK + 1 states of one block in scratch.
CHUNK = 32
# Channels per work item. Gradients of B and C are summed over channels per block, so the
# block size (and not the thread count) fixes the order of that sum.
BLOCK = 64
_BASE_FLAGS = ("-O3", "-ffast-math", "-fPIC", "-shared", "-pthread")
_C_TYPES = {torch.float32: ("float", ctypes.c_float), torch.float64: ("double", ctypes.c_double)}

_lock = threading.Lock()
_libraries: dict[torch.dtype, ctypes.CDLL] = {}
_build_error: str | None = None


class CpuKernelUnavailable(RuntimeError):
    """The C scan kernel could not be compiled or loaded on this machine."""


def cache_dir() -> Path:
    """Return the folder for compiled kernels: $SAMBA_KERNEL_CACHE, else the user cache folder."""
    if os.environ.get("SAMBA_KERNEL_CACHE"):
        return Path(os.environ["SAMBA_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "samba" / "kernels"


def _cpu_signature() -> str:
    """Describe the processor, because -march=native builds for the one it runs on."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(compiler: str, flags: tuple[str, ...], real: str, target: Path) -> str | None:
    """Compile SOURCE into `target` atomically. Returns None on success, else the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".so")
    os.close(handle)
    command = [compiler, *flags, f"-DREAL={real}", "-o", temp_name, str(SOURCE), "-lm"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            return (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        os.replace(temp_name, target)
        return None
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    finally:
        Path(temp_name).unlink(missing_ok=True)


def _build(dtype: torch.dtype) -> ctypes.CDLL:
    real, _ = _C_TYPES[dtype]
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise CpuKernelUnavailable(f"no C compiler {compiler!r} on PATH; install gcc or clang, or set CC")
    source = SOURCE.read_bytes()
    errors = []
    # -march=native vectorises exp for the processor at hand; the second try builds portable code.
    for flags in ((*_BASE_FLAGS, "-march=native"), _BASE_FLAGS):
        key = hashlib.sha256(repr((source, flags, compiler, real, _cpu_signature())).encode()).hexdigest()[:16]
        target = cache_dir() / f"selective_scan_cpu_{real}_{key}.so"
        error = None if target.is_file() else _compile(compiler, flags, real, target)
        if error is None:
            library = ctypes.CDLL(str(target))
            _declare(library, dtype)
            return library
        errors.append(error)
    raise CpuKernelUnavailable(f"compiling {SOURCE.name} with {compiler} failed: {errors[-1]}")


def _declare(library: ctypes.CDLL, dtype: torch.dtype) -> None:
    pointer = ctypes.POINTER(_C_TYPES[dtype][1])
    sizes = [ctypes.c_int64] * 6
    library.scan_forward.argtypes = [*sizes, *[pointer] * 11, ctypes.c_int]
    library.scan_forward.restype = ctypes.c_int
    library.scan_backward.argtypes = [*sizes, *[pointer] * 17, ctypes.c_int]
    library.scan_backward.restype = ctypes.c_int


def load_library(dtype: torch.dtype) -> ctypes.CDLL:
    """Return the kernel library for float32 or float64, compiling it on first use.

    Raises CpuKernelUnavailable when it cannot be built, and again on every later call
    without retrying the compiler.
    """
    global _build_error
    with _lock:
        if dtype in _libraries:
            return _libraries[dtype]
        if _build_error is not None:
            raise CpuKernelUnavailable(_build_error)
        try:
            _libraries[dtype] = _build(dtype)
        except (CpuKernelUnavailable, OSError) as error:
            _build_error = str(error)
            raise CpuKernelUnavailable(_build_error) from None
        return _libraries[dtype]


def cpu_kernel_error() -> str | None:
    """Return why the kernel cannot be used, or None when both libraries load."""
    try:
        for dtype in _C_TYPES:
            load_library(dtype)
    except CpuKernelUnavailable as error:
        return str(error)
    return None


def _ptr(tensor: Tensor | None):
    return None if tensor is None else ctypes.cast(tensor.data_ptr(), ctypes.POINTER(_C_TYPES[tensor.dtype][1]))


def _n_chunks(length: int) -> int:
    return -(-length // CHUNK)


def _n_blocks(d_inner: int) -> int:
    return -(-d_inner // BLOCK)


class CpuKernelScan(torch.autograd.Function):
    """Autograd wrapper of the C kernel. Inputs are contiguous, on the CPU and of one dtype (float32 or float64).

    Returns (y, states, last_state), where states is an empty tensor unless return_states.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, h0, return_states: bool):
        library = load_library(u.dtype)
        batch, length, d_inner = u.shape
        d_state = A.shape[1]
        y = torch.empty_like(u)
        last_state = u.new_empty(batch, d_inner, d_state)
        states = u.new_empty(batch, length, d_inner, d_state) if return_states else u.new_empty(0)
        checkpoints = u.new_empty(batch, _n_chunks(length), d_inner, d_state)
        status = library.scan_forward(
            batch, length, d_inner, d_state, BLOCK, CHUNK,
            _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(h0),
            _ptr(y), _ptr(last_state), _ptr(states) if return_states else None, _ptr(checkpoints),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("the C scan kernel could not allocate its thread scratch memory")
        ctx.save_for_backward(u, delta, A, B, C, D, checkpoints)
        ctx.has_h0 = h0 is not None
        if not return_states:
            ctx.mark_non_differentiable(states)
        return y, states, last_state

    @staticmethod
    def backward(ctx, grad_y, grad_states, grad_last):
        u, delta, A, B, C, D, checkpoints = ctx.saved_tensors
        library = load_library(u.dtype)
        batch, length, d_inner = u.shape
        d_state = A.shape[1]
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y.contiguous()
        grad_states = None if grad_states is None or grad_states.numel() == 0 else grad_states.contiguous()
        grad_last = None if grad_last is None else grad_last.contiguous()

        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_A_part = u.new_empty(batch, d_inner, d_state)
        grad_B_part = u.new_empty(_n_blocks(d_inner), batch, length, d_state)
        grad_C_part = u.new_empty(_n_blocks(d_inner), batch, length, d_state)
        grad_D_part = u.new_empty(batch, d_inner)
        grad_h0 = u.new_empty(batch, d_inner, d_state)
        status = library.scan_backward(
            batch, length, d_inner, d_state, BLOCK, CHUNK,
            _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(checkpoints),
            _ptr(grad_y), _ptr(grad_states), _ptr(grad_last),
            _ptr(grad_u), _ptr(grad_delta), _ptr(grad_A_part), _ptr(grad_B_part), _ptr(grad_C_part),
            _ptr(grad_D_part), _ptr(grad_h0), torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("the C scan kernel could not allocate its thread scratch memory")
        return (grad_u, grad_delta, grad_A_part.sum(0), grad_B_part.sum(0), grad_C_part.sum(0),
                grad_D_part.sum(0), grad_h0 if ctx.has_h0 else None, None)


def cpu_kernel_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None,
                    return_states: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Run the C kernel on inputs already in one compute dtype. Returns (y, states or None, last_state)."""
    tensors = [t.contiguous() for t in (u, delta, A, B, C, D)]
    y, states, last_state = CpuKernelScan.apply(*tensors, None if h0 is None else h0.contiguous(), return_states)
    return y, states if return_states else None, last_state
