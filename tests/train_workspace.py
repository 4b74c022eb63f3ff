"""A small training workspace for tests: dvc.yaml, the tiny params profile and tokenized PTB lines."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from conftest import REPO_ROOT, tool_env, write_params
from pipeline.params import load_params
from pipeline.stages.tokenize import run_tokenize


def make_workspace(folder: Path, ptb_dir: Path, **overrides: dict) -> Path:
    """Create `folder` with dvc.yaml (which marks the project root), params.yaml and data/tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO_ROOT / "dvc.yaml", folder / "dvc.yaml")
    write_params(folder / "params.yaml", ptb_dir, **overrides)
    run_tokenize(load_params(folder / "params.yaml"), folder / "data" / "tokens")
    return folder


def train_command(kind: str, out: str = "models", **options: str) -> list[str]:
    """Return `samba train` with outputs under `out` (models, metrics and plots side by side)."""
    command = ["samba", "train", "--kind", kind, "--out", f"{out}/{kind}", "--metrics-dir", f"{out}/metrics",
               "--plots-dir", f"{out}/plots"]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", value]
    return command


def start(command: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a command in its own session, with stdout and stderr in `log`."""
    with log.open("w", encoding="utf-8") as handle:
        return subprocess.Popen(command, cwd=cwd, env=env or tool_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def read_outputs(out: Path, kind: str) -> dict:
    """Return the bytes of the weights, the metrics JSON and the loss columns of the curve."""
    curve = (out / "plots" / f"train_{kind}.csv").read_text(encoding="utf-8").splitlines()
    header = curve[0].split(",")
    keep = [index for index, name in enumerate(header) if name != "tokens_per_s"]
    return {
        "weights": (out / kind / "model.safetensors").read_bytes(),
        "metrics": json.loads((out / "metrics" / f"train_{kind}.json").read_text(encoding="utf-8")),
        "curve": [[line.split(",")[index] for index in keep] for line in curve],
    }


def state_files(root: Path) -> list[Path]:
    return sorted((root / ".samba" / "resume").glob("*/train_state.safetensors"))

