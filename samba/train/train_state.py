"""Training state for resuming: weights, AdamW state, RNG states and the loop's progress in one file.

The file is safetensors: every tensor (weights, optimizer moments and step counts, RNG
states) is a named tensor, and everything else (the step, the logged curve, optimizer
hyperparameters, Python's RNG state) is one JSON document in the file's metadata. Loading
parses only safetensors and JSON, so a state file cannot run code. One file means one
atomic rename, so a crash during a save leaves the previous state whole.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from samba.train.checkpoint import CheckpointError, write_atomically

STATE_FILE = "train_state.safetensors"
FORMAT = "samba-train-state/1"
_MODEL = "model."
_OPTIMIZER = "optimizer."
_RNG_CPU = "rng.torch"
_RNG_CUDA = "rng.cuda."


@dataclass(frozen=True)
class StepRecord:
    """The averages over one logging interval, reported at its last step (1-based)."""

    step: int
    losses: dict[str, float]
    lr: float
    grad_norm: float
    tokens_per_s: float


@dataclass
class TrainProgress:
    """The training loop's position and logged history, the part of a state besides weights and optimizer.

    step counts finished optimizer steps, so the next batch is `stream.batch(step)`.
    The interval sums cover the steps since the last logged record, so a resumed run
    logs the same averages as an uninterrupted one.
    """

    step: int = 0
    seconds: float = 0.0
    records: list[StepRecord] = field(default_factory=list)
    interval_sums: dict[str, float] = field(default_factory=dict)
    interval_steps: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainProgress:
        records = [StepRecord(**record) for record in raw["records"]]
        return cls(step=int(raw["step"]), seconds=float(raw["seconds"]), records=records,
                   interval_sums=dict(raw["interval_sums"]), interval_steps=int(raw["interval_steps"]),
                   last=dict(raw["last"]))


def save_train_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     progress: TrainProgress, extra: dict | None = None) -> None:
    """Write the full training state to `path` atomically (temporary file, fsync, rename)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        # clone() gives tied weights their own storage, which safetensors requires.
        tensors[_MODEL + name] = tensor.detach().to("cpu", copy=True).contiguous()
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, slots in optimizer_state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{index}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors[_RNG_CPU] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{_RNG_CUDA}{device}"] = state
    document = {
        "format": FORMAT,
        "progress": progress.to_dict(),
        "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
        "python_random": random.getstate(),
        "extra": extra or {},
    }
    metadata = {"samba": json.dumps(document, allow_nan=False)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda name: save_file(tensors, name, metadata=metadata))


def load_train_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[TrainProgress, dict]:
    """Restore weights, optimizer and RNG states from `path`; return the progress and the extra dict.

    Raises CheckpointError when the file is unreadable or does not fit `model` and `optimizer`.
    """
    fix = f"delete {path} to start training from step 0"
    try:
        with safe_open(str(path), framework="pt") as handle:
            document = json.loads((handle.metadata() or {})["samba"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"training state {path} is truncated or corrupted "
                              f"({_first_line(error)}): {fix}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"training state {path} is not in the {FORMAT} format: {fix}")
    try:
        _load_model(model, tensors)
        optimizer.load_state_dict(_optimizer_state_dict(document["optimizer"], tensors))
        progress = TrainProgress.from_dict(document["progress"])
        _restore_rng(document["python_random"], tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"training state {path} does not fit this model and optimizer "
                              f"({_first_line(error)}): {fix}") from None
    return progress, document["extra"]


def read_state_extra(path: Path) -> dict:
    """Return the extra dict saved with the state at `path` without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            document = json.loads((handle.metadata() or {})["samba"])
        extra = document["extra"]
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"training state {path} is truncated or corrupted ({_first_line(error)}): "
                              f"delete {path} to start training from step 0") from None
    return extra if isinstance(extra, dict) else {}


def _load_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    stored = {key.removeprefix(_MODEL): value for key, value in tensors.items() if key.startswith(_MODEL)}
    if set(stored) != set(expected):
        missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise ValueError(f"missing weights {missing[:3]}, unexpected weights {unexpected[:3]}")
    for name, value in stored.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(stored, strict=True)


def _optimizer_state_dict(document: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(_OPTIMIZER):
            index, slot = key.removeprefix(_OPTIMIZER).split(".", 1)
            state.setdefault(int(index), {})[slot] = value
    for index, slots in document["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": document["param_groups"]}


def _restore_rng(python_state: list, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss_next = python_state
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(tensors[_RNG_CPU])
    cuda_keys = sorted((key for key in tensors if key.startswith(_RNG_CUDA)),
                       key=lambda key: int(key.removeprefix(_RNG_CUDA)))
    cuda_states = [tensors[key] for key in cuda_keys]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
