"""Model checkpoints: weights in safetensors, the configuration in JSON.

Loading never unpickles anything, so a checkpoint from an untrusted source cannot
run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from samba.model import MambaConfig, ReadoutConfig, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or does not match its config."""


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Write `path` through `write(temp_name)`, so a crash at any moment leaves the old file or the new one.

    The temporary file sits in the same folder, is flushed to disk with fsync and then
    renamed over `path` (os.replace is atomic on POSIX and Windows). The folder is synced
    too, so the rename itself survives a power loss on POSIX file systems.
    """
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temp_name)
        _fsync(temp_name, os.O_RDONLY)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    if os.name == "posix":
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: str | Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(folder: Path, model: nn.Module, kind: str, mamba: MambaConfig,
                    readout: ReadoutConfig | None, extra: dict | None = None) -> None:
    """Write model.safetensors and config.json into `folder`, each via a temporary file and a rename."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "kind": kind,
        "mamba": mamba.to_dict(),
        "readout": readout.to_dict() if readout is not None else None,
        **(extra or {}),
    }
    write_atomically(folder / WEIGHTS_FILE, lambda name: save_model(model, name))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_atomically(folder / CONFIG_FILE, lambda name: Path(name).write_text(text, encoding="utf-8"))


def read_checkpoint_config(folder: Path) -> dict:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint config not found: {config_path} (train the model first)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["kind"], config["mamba"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint config {config_path} is corrupted ({error}): retrain the model") from None
    return config


def load_checkpoint(folder: Path) -> tuple[nn.Module, dict]:
    """Build the model that config.json describes and load its weights (strictly)."""
    folder = Path(folder)
    config = read_checkpoint_config(folder)
    try:
        mamba = MambaConfig(**config["mamba"])
        readout = ReadoutConfig(**config["readout"]) if config["readout"] else None
        model = build_model(config["kind"], mamba, readout)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint config {folder / CONFIG_FILE} is invalid ({error}): retrain the model") from None
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights} (train the model first)")
    try:
        missing, unexpected = load_model(model, weights, strict=False)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise CheckpointError(f"checkpoint weights {weights} cannot be loaded ({str(error).splitlines()[0]}): "
                              "the file is truncated, corrupted or from another model shape; retrain the model") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights {weights} do not match {folder / CONFIG_FILE}: "
                              f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}; retrain the model")
    model.eval()
    return model, config
