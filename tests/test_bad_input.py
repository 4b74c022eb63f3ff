"""Bad input end to end: each case runs a real `samba` command and expects one `error:` line.

Every case checks four things: a non-zero exit, exactly one line that starts with
`error:`, no traceback, and fragments of that line that name the key or file and say
what to do. Files are real: tokenized PTB lines, checkpoints trained for two steps, and
corpus files written as the case needs them.

On "d_model not divisible as required": the pure-PyTorch Mamba-1 here puts no
divisibility constraint on d_model (d_inner = expand * d_model and dt_rank =
ceil(d_model / 16) exist for every positive d_model), so no such check is invented. The
divisibility constraint that does exist is the global batch over the training processes,
covered by the WORLD_SIZE cases.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tool_env, write_params
from pipeline.cli import app
from pipeline.params import load_params
from pipeline.stages.tokenize import run_tokenize
from samba.model import MambaConfig, build_model
from samba.train.optim import build_optimizer
from samba.train.train_state import STATE_FILE, TrainProgress, save_train_state
from train_workspace import make_workspace

runner = CliRunner()
QUIET = {"tracking": {"enabled": False}}


@dataclass
class World:
    """The shared files the cases start from."""

    root: Path
    ptb: Path
    params: Path
    tokens: Path
    other_tokens: Path  # Same text, another vocabulary size, so another tokenizer.
    baseline: Path
    samba: Path


@dataclass
class Case:
    id: str
    # Builds the command line (without `samba`) in a fresh folder; may write files there.
    build: Callable[[World, Path], list[str]]
    expected: list[str]
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False  # For environment variables that libraries read at import time.


@pytest.fixture(scope="module")
def world(tmp_path_factory, ptb_dir) -> World:
    root = tmp_path_factory.mktemp("bad-input")
    make_workspace(root, ptb_dir, train={"steps": 2, "log_every": 1}, **QUIET)
    other = root / "other-tokens"
    write_params(root / "other.yaml", ptb_dir, tokenizer={"vocab_size": 300}, **QUIET)
    run_tokenize(load_params(root / "other.yaml"), other)
    for kind in ("baseline", "samba"):
        result = runner.invoke(app, ["train", "--kind", kind, "--params", str(root / "params.yaml"),
                                     "--tokens", str(root / "data" / "tokens"), "--out", str(root / "models" / kind),
                                     "--metrics-dir", str(root / "metrics"), "--plots-dir", str(root / "plots"),
                                     "--checkpoint-dir", str(root / "state" / kind)])
        assert result.exit_code == 0, result.output
    return World(root=root, ptb=ptb_dir, params=root / "params.yaml", tokens=root / "data" / "tokens",
                 other_tokens=other, baseline=root / "models" / "baseline", samba=root / "models" / "samba")


# Command builders ------------------------------------------------------------------------------------

def params_file(world: World, folder: Path, **overrides: dict) -> Path:
    path = folder / "params.yaml"
    write_params(path, world.ptb, **{**QUIET, **overrides})
    return path


def raw_params(folder: Path, content: str | bytes) -> Path:
    path = folder / "params.yaml"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def train_args(world: World, folder: Path, params: Path | None = None, **paths: Path) -> list[str]:
    values = {"tokens": world.tokens, "out": folder / "model", "metrics-dir": folder / "metrics",
              "plots-dir": folder / "plots", "checkpoint-dir": folder / "state", **paths}
    args = ["train", "--kind", "baseline", "--params", str(params or world.params)]
    for name, value in values.items():
        args += [f"--{name}", str(value)]
    return args


def train_with(**overrides: dict) -> Callable[[World, Path], list[str]]:
    return lambda world, folder: train_args(world, folder, params_file(world, folder, **overrides))


def train_with_yaml(content: str | bytes) -> Callable[[World, Path], list[str]]:
    return lambda world, folder: train_args(world, folder, raw_params(folder, content))


def corpus_folder(folder: Path, world: World, files: dict[str, bytes | None]) -> Path:
    """Copy the PTB splits into `folder`, then replace (bytes) or delete (None) the named files."""
    corpus = folder / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy2(world.ptb / f"{split}.txt", corpus / f"{split}.txt")
    for name, content in files.items():
        if content is None:
            (corpus / name).unlink()
        else:
            (corpus / name).write_bytes(content)
    return corpus


def tokenize_with(files: dict[str, bytes | None] | None = None, local_dir: str | None = None,
                  **overrides: dict) -> Callable[[World, Path], list[str]]:
    def build(world: World, folder: Path) -> list[str]:
        directory = local_dir.format(folder=folder) if local_dir else str(corpus_folder(folder, world, files or {}))
        data = {"source": "local", "local_dir": directory, **overrides.pop("data", {})}
        params = params_file(world, folder, data=data, **overrides)
        return ["tokenize", "--params", str(params), "--out", str(folder / "tokens")]

    return build


def evaluate_with(prepare: Callable[[World, Path], dict[str, Path]]) -> Callable[[World, Path], list[str]]:
    def build(world: World, folder: Path) -> list[str]:
        paths = {"tokens": world.tokens, "baseline": world.baseline, "samba": world.samba,
                 "out": folder / "evaluate.json", **prepare(world, folder)}
        args = ["evaluate", "--params", str(world.params)]
        for name, value in paths.items():
            args += [f"--{name}", str(value)]
        return args

    return build


def copied_checkpoint(world: World, folder: Path, kind: str = "baseline") -> Path:
    target = folder / kind
    shutil.copytree(world.baseline if kind == "baseline" else world.samba, target)
    return target


def truncated_weights(world: World, folder: Path) -> dict[str, Path]:
    checkpoint = copied_checkpoint(world, folder)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    return {"baseline": checkpoint}


def garbled_config(world: World, folder: Path) -> dict[str, Path]:
    checkpoint = copied_checkpoint(world, folder)
    (checkpoint / "config.json").write_text('{"kind": "baseline", "mamba": {', encoding="utf-8")
    return {"baseline": checkpoint}


def other_shape_config(world: World, folder: Path) -> dict[str, Path]:
    checkpoint = copied_checkpoint(world, folder)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    config["mamba"]["d_state"] *= 2
    (checkpoint / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return {"baseline": checkpoint}


def foreign_weights(world: World, folder: Path) -> dict[str, Path]:
    checkpoint = copied_checkpoint(world, folder)
    shutil.copy2(world.samba / "model.safetensors", checkpoint / "model.safetensors")
    return {"baseline": checkpoint}


def corrupted_tokens(world: World, folder: Path) -> list[str]:
    tokens = folder / "tokens"
    shutil.copytree(world.tokens, tokens)
    (tokens / "tokens.safetensors").write_bytes(b"\x00" * 64)
    return train_args(world, folder, tokens=tokens)


def corrupted_state(world: World, folder: Path) -> list[str]:
    (folder / "state").mkdir()
    (folder / "state" / STATE_FILE).write_bytes(b"not a safetensors file")
    return train_args(world, folder)


def foreign_state(world: World, folder: Path) -> list[str]:
    model = build_model("baseline", MambaConfig(vocab_size=20, d_model=8, n_layers=1, d_state=2))
    save_train_state(folder / "state" / STATE_FILE, model, build_optimizer(model, lr=1e-3, weight_decay=0.0),
                     TrainProgress(step=1), extra={"resume_key": "0123456789abcdef"})
    return train_args(world, folder)


def under_a_file(folder: Path) -> Path:
    blocker = folder / "a_file"
    blocker.write_text("a regular file, not a folder\n", encoding="utf-8")
    return blocker / "sub"


ABSURD_MODEL = {"model": {"d_model": 8192, "n_layers": 64, "d_state": 256},
                "train": {"batch_size": 1024, "seq_len": 4096}}

CASES = [
    # params.yaml: unknown or misspelled keys
    Case("unknown-section", train_with_yaml("lss:\n  readout_weight: 0.1\n"), ["'lss'", "did you mean 'loss'"]),
    Case("misspelled-loss-key", train_with_yaml("loss:\n  prunning_weight: 0.1\n"),
         ["loss.prunning_weight", "did you mean 'pruning_weight'"]),
    Case("misspelled-train-key", train_with_yaml("train:\n  batchsize: 8\n"),
         ["train.batchsize", "did you mean 'batch_size'"]),
    # params.yaml: wrong types
    Case("lr-not-a-number", train_with_yaml("train:\n  lr: fast\n"), ["train.lr", "valid number"]),
    Case("d-model-fraction", train_with_yaml("model:\n  d_model: 12.5\n"), ["model.d_model", "integer"]),
    Case("enabled-not-bool", train_with_yaml("tracking:\n  enabled: maybe\n"), ["tracking.enabled", "boolean"]),
    Case("nan-weight", train_with_yaml("loss:\n  readout_weight: .nan\n"), ["loss.readout_weight", "finite"]),
    # params.yaml: zero or negative sizes
    Case("zero-d-model", train_with(model={"d_model": 0}), ["model.d_model", "greater than 0"]),
    Case("negative-layers", train_with(model={"n_layers": -2}), ["model.n_layers", "greater than 0"]),
    Case("zero-batch", train_with(train={"batch_size": 0}), ["train.batch_size", "greater than 0"]),
    Case("negative-steps", train_with(train={"steps": -5}), ["train.steps", "greater than 0"]),
    Case("vocab-too-small", train_with(tokenizer={"vocab_size": 2}), ["tokenizer.vocab_size", "greater than 2"]),
    Case("negative-checkpoint-every", train_with(train={"checkpoint_every": -1}),
         ["train.checkpoint_every", "greater than or equal to 0"]),
    # params.yaml: invalid choices and cross-field rules
    Case("unknown-source", train_with(data={"source": "web"}), ["data.source", "'hub', 'local' or 'synthetic'"]),
    Case("unknown-device", train_with(train={"device": "tpu"}), ["train.device", "'cpu' or 'cuda'"]),
    Case("dt-min-above-max", train_with(model={"dt_min": 0.5, "dt_max": 0.1}), ["model", "dt_min (0.5)"]),
    Case("min-lr-above-lr", train_with(train={"lr": 0.001, "min_lr": 0.01}), ["train", "min_lr (0.01)"]),
    Case("local-without-folder", train_with_yaml("data:\n  source: local\n"), ["data.local_dir"]),
    # params.yaml: the file itself
    Case("yaml-syntax", train_with_yaml("data: [\n"), ["params.yaml is not valid YAML"]),
    Case("yaml-list", train_with_yaml("- a\n- b\n"), ["mapping of sections"]),
    Case("params-missing", lambda world, folder: train_args(world, folder, folder / "absent.yaml"),
         ["params file not found", "absent.yaml", "--params"]),
    Case("params-not-utf8", train_with_yaml(b"train:\n  lr: caf\xe9\n"), ["params.yaml is not UTF-8", "save it as UTF-8"]),
    Case("params-binary", train_with_yaml(b"train:\n  lr: 0.1\x00\x01\n"), ["not valid YAML", "#x0000"]),
    # Processes and hardware
    Case("batch-not-divisible", train_with(train={"batch_size": 4}), ["train.batch_size=4", "multiple of 3"],
         env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}),
    Case("rank-not-integer", train_args, ["RANK='zero'", "torchrun"],
         env={"WORLD_SIZE": "2", "RANK": "zero", "LOCAL_RANK": "0"}),
    Case("memory-exceeded", train_with(**ABSURD_MODEL), ["estimated", "free", "train.batch_size", "--no-memory-check"]),
    # Corpus files
    Case("seq-len-over-split", train_with(train={"seq_len": 100000}), ["train.seq_len", "lower batch_size or seq_len"]),
    Case("missing-split", tokenize_with({"valid.txt": None}), ["corpus file not found", "valid.txt"]),
    Case("empty-file", tokenize_with({"train.txt": b""}), ["corpus file is empty", "train.txt", "add the train text"]),
    Case("whitespace-file", tokenize_with({"test.txt": b" \n\t\n  \n"}), ["only whitespace", "test.txt"]),
    Case("binary-file", tokenize_with({"train.txt": b"\x89PNG\r\n\x1a\n\x00\x00"}), ["binary", "train.txt"]),
    Case("latin1-file", tokenize_with({"valid.txt": "caf\u00e9 au lait\n".encode("latin-1")}),
         ["not valid UTF-8", "valid.txt", "iconv"]),
    Case("corpus-folder-missing", tokenize_with(local_dir="{folder}/nowhere"),
         ["data.local_dir", "corpus folder not found", "nowhere"]),
    Case("corpus-folder-is-file", tokenize_with(local_dir=str(Path(__file__))), ["not a directory"]),
    Case("vocab-beyond-corpus", tokenize_with(tokenizer={"vocab_size": 1_000_000}),
         ["tokenizer.vocab_size=1000000"]),
    Case("hub-offline", lambda world, folder: ["tokenize", "--params", str(params_file(world, folder,
                                               data={"source": "hub"})), "--out", str(folder / "tokens")],
         ["Hugging Face Hub", "data.local_dir"], subprocess=True),
    # Tokenized data
    Case("tokens-missing", lambda world, folder: train_args(world, folder, tokens=folder / "none"),
         ["tokenized data not found", "samba tokenize"]),
    Case("tokens-corrupted", corrupted_tokens, ["corrupted", "rerun `samba tokenize`"]),
    # Checkpoints
    Case("checkpoint-missing", evaluate_with(lambda world, folder: {"baseline": folder / "none"}),
         ["checkpoint config not found", "train the model first"]),
    Case("checkpoint-truncated", evaluate_with(truncated_weights), ["truncated, corrupted", "retrain"]),
    Case("checkpoint-config-corrupted", evaluate_with(garbled_config), ["config.json is corrupted", "retrain"]),
    Case("checkpoint-other-shape", evaluate_with(other_shape_config), ["cannot be loaded", "model shape"]),
    Case("checkpoint-other-model", evaluate_with(foreign_weights), ["do not match", "retrain"]),
    Case("checkpoint-wrong-kind", evaluate_with(lambda world, folder: {"baseline": world.samba}),
         ["holds a samba checkpoint, expected baseline"]),
    Case("checkpoint-other-tokenizer", evaluate_with(lambda world, folder: {"tokens": world.other_tokens}),
         ["another tokenizer", "dvc repro"]),
    Case("train-state-corrupted", corrupted_state, ["train_state.safetensors", "truncated or corrupted",
                                                    "--no-resume"]),
    Case("train-state-other-config", foreign_state, ["other params, tokens or training code", "--no-resume"]),
    # Outputs that cannot be written (a path below a regular file fails for root too)
    Case("train-out-unwritable", lambda world, folder: train_args(world, folder, out=under_a_file(folder)),
         ["cannot write to", "a_file/sub", "--out"]),
    Case("train-metrics-unwritable",
         lambda world, folder: train_args(world, folder, **{"metrics-dir": under_a_file(folder)}),
         ["cannot write to", "--metrics-dir"]),
    Case("train-state-unwritable",
         lambda world, folder: train_args(world, folder, **{"checkpoint-dir": under_a_file(folder)}),
         ["training-state folder", "--checkpoint-dir"]),
    Case("tokenize-out-unwritable",
         lambda world, folder: ["tokenize", "--params", str(world.params), "--out", str(under_a_file(folder))],
         ["cannot use", "a_file/sub"]),
    Case("evaluate-out-unwritable",
         evaluate_with(lambda world, folder: {"out": under_a_file(folder) / "evaluate.json"}),
         ["cannot use", "a_file/sub"]),
]


def run_case(case: Case, world: World, folder: Path) -> tuple[int, str, bool]:
    """Run the case's command; return the exit code, stderr and whether a traceback appeared."""
    args = case.build(world, folder)
    if case.subprocess:
        env = {**tool_env(), **case.env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HOME": str(folder / "hf")}
        result = subprocess.run([sys.executable, "-c", "from pipeline.cli import app; app()", *args], cwd=world.root,
                                env=env, capture_output=True, text=True, timeout=300)
        return result.returncode, result.stderr, "Traceback" in result.stderr
    result = runner.invoke(app, args, env=case.env)
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    return result.exit_code, result.stderr, crashed


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_one_error_line(case, world, tmp_path, monkeypatch):
    monkeypatch.chdir(world.root)
    code, stderr, crashed = run_case(case, world, tmp_path)

    assert code != 0
    assert not crashed, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for fragment in case.expected:
        assert fragment in lines[0]


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


def test_cuda_without_gpu_is_rejected(world, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present, so train.device cuda is valid here")
    monkeypatch.chdir(world.root)
    case = Case("cuda-without-gpu", train_with(train={"device": "cuda"}), ["train.device is cuda", "set train.device to cpu"])
    code, stderr, crashed = run_case(case, world, tmp_path)

    assert code == 2
    assert not crashed
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    for fragment in case.expected:
        assert fragment in line
