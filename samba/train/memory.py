"""An estimate of the memory one training process needs, and the memory the machine has free.

Training is refused up front when the estimate exceeds what is free, instead of being
killed by the out-of-memory killer hours in. The estimate counts float32 values:

- weights, gradients and AdamW's two moments: 4 values per parameter;
- per layer, for Samba only, the returned states (batch, length, d_inner, d_state) that
  the readout and the pruning loss read, and their concatenation for the readout (2 per
  layer). The scan kernels keep only a checkpoint every CHUNK positions, so the baseline
  keeps no state-sized tensor;
- per layer, about 12 (batch, length, d_inner) and 4 (batch, length, d_model) tensors
  (projections, convolution, gates, residual stream);
- the logits, their log-softmax and their gradient, each (batch, length, vocab_size), once
  for the LM head and once more for Samba's readout, plus the readout's hidden layer;
- while one Samba layer runs backward, the gradients of 2 state-sized tensors.

NOTE: these counts follow the scan backends that keep checkpoints (the C kernel on CPU,
the chunked PyTorch scan, mamba-ssm's fused kernel). Allocator overhead and the Python
process itself are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from samba.model import MambaConfig, ReadoutConfig

BYTES_PER_VALUE = 4  # float32 weights, optimizer state and activations
_INNER_SAVED_PER_LAYER = 12
_MODEL_SAVED_PER_LAYER = 4
_LOGIT_COPIES = 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process needs, by kind."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = (("weights", self.weights), ("gradients", self.gradients), ("AdamW state", self.optimizer),
                 ("activations", self.activations))
        return f"{format_bytes(self.total)} ({', '.join(f'{name} {format_bytes(size)}' for name, size in parts)})"


def count_parameters(kind: str, mamba: MambaConfig, readout: ReadoutConfig | None) -> int:
    """Return the model's parameter count without building it (tied embedding and head counted once)."""
    d_inner, d_state, dt_rank = mamba.d_inner, mamba.d_state, mamba.resolved_dt_rank
    per_layer = (
        mamba.d_model  # RMSNorm gain
        + mamba.d_model * 2 * d_inner  # in_proj
        + d_inner * mamba.d_conv + d_inner  # depthwise conv1d with bias
        + d_inner * (dt_rank + 2 * d_state)  # x_proj
        + dt_rank * d_inner + d_inner  # dt_proj with bias
        + d_inner * d_state + d_inner  # A_log and D
        + d_inner * mamba.d_model  # out_proj
    )
    total = mamba.vocab_size * mamba.d_model + mamba.n_layers * per_layer + mamba.d_model
    if kind == "samba":
        hidden = (readout or ReadoutConfig()).hidden_size
        features = mamba.n_layers * d_inner * d_state
        total += features * hidden + hidden + hidden * mamba.vocab_size + mamba.vocab_size
    return total


def estimate_training_memory(kind: str, mamba: MambaConfig, readout: ReadoutConfig | None,
                             batch: int, seq_len: int) -> MemoryEstimate:
    """Estimate the peak memory of one training step with `batch` sequences of `seq_len` tokens."""
    params = count_parameters(kind, mamba, readout)
    tokens = batch * seq_len
    state_values = tokens * mamba.d_inner * mamba.d_state  # one (batch, length, d_inner, d_state) tensor
    # Samba keeps every layer's states for the readout and the pruning loss; the baseline keeps none.
    kept_states = 1 if kind == "samba" else 0
    per_layer = (kept_states * state_values + _INNER_SAVED_PER_LAYER * tokens * mamba.d_inner
                 + _MODEL_SAVED_PER_LAYER * tokens * mamba.d_model)
    activations = mamba.n_layers * per_layer + _LOGIT_COPIES * tokens * mamba.vocab_size
    activations += 2 * kept_states * state_values  # one layer's gradients during backward
    if kind == "samba":
        hidden = (readout or ReadoutConfig()).hidden_size
        activations += mamba.n_layers * state_values + 2 * tokens * hidden + _LOGIT_COPIES * tokens * mamba.vocab_size
    return MemoryEstimate(weights=BYTES_PER_VALUE * params, gradients=BYTES_PER_VALUE * params,
                          optimizer=2 * BYTES_PER_VALUE * params, activations=BYTES_PER_VALUE * activations)


def available_memory(device: torch.device) -> int | None:
    """Return the bytes free for a new allocation on `device`, or None when it cannot be read.

    GPU: free memory as the CUDA driver reports it. CPU: MemAvailable from /proc/meminfo,
    capped by the free part of a cgroup memory limit (containers), where one is set.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    candidates = [value for value in (_meminfo_available(), _cgroup_free()) if value is not None]
    return min(candidates) if candidates else None


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


def _meminfo_available() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # The file counts kibibytes.
    return None


def _cgroup_free() -> int | None:
    """Return limit - usage of this process's cgroup (v2, then v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text(encoding="ascii").strip()
            usage = int(Path(usage_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        # cgroup v2 writes "max" for no limit; v1 writes a huge number close to 2**63.
        if limit_text == "max" or int(limit_text) >= 1 << 60:
            return None
        return max(int(limit_text) - usage, 0)
    return None
