"""Sampling and the `samba generate` command on checkpoints trained on real PTB text."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import run, write_params
from pipeline.cli import app
from pipeline.params import load_params
from pipeline.stages.tokenize import TOKENIZER_FILE, run_tokenize
from pipeline.stages.train import TrainOutputs, run_train
from samba.generate import generate, sample_next
from samba.model import MambaConfig, MambaLM, SambaConfig, SambaLM
from samba.sparsity import install, sparse_linear

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ptb_dir: Path) -> dict[str, Path]:
    """Tokens and both checkpoints from the tiny profile, trained in-process without tracking."""
    root = tmp_path_factory.mktemp("generate")
    write_params(root / "params.yaml", ptb_dir, tracking={"enabled": False})
    params = load_params(root / "params.yaml")
    run_tokenize(params, root / "tokens")
    paths = {"tokens": root / "tokens"}
    for kind in ("baseline", "samba"):
        paths[kind] = root / "models" / kind
        outputs = TrainOutputs(checkpoint=paths[kind], metrics=root / f"train_{kind}.json",
                               timing=root / f"timing_{kind}.json", curve=root / f"train_{kind}.csv")
        run_train(params, kind, root / "tokens", outputs, checkpoint_dir=root / "state" / kind)
    return paths


def invoke(trained: dict[str, Path], *args: str, kind: str = "baseline"):
    return runner.invoke(app, ["generate", "--checkpoint", str(trained[kind]), "--tokens", str(trained["tokens"]),
                               *args])


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_generate_continues_prompt(trained, kind: str) -> None:
    result = invoke(trained, "--prompt", "the company said", "--n-tokens", "20", kind=kind)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("the company said ")
    # 3 prompt words and 20 generated tokens; an <eos> token becomes a line break.
    assert len(result.stdout.split()) + result.stdout.count("\n") - 1 >= 20


def test_same_seed_gives_same_text(trained) -> None:
    first = invoke(trained, "--prompt", "the", "--n-tokens", "30", "--seed", "3", "--top-k", "50")
    second = invoke(trained, "--prompt", "the", "--n-tokens", "30", "--seed", "3", "--top-k", "50")
    other = invoke(trained, "--prompt", "the", "--n-tokens", "30", "--seed", "4", "--top-k", "50")
    assert first.exit_code == second.exit_code == other.exit_code == 0
    assert first.stdout == second.stdout
    assert first.stdout != other.stdout


def test_empty_prompt_starts_a_sentence(trained) -> None:
    result = invoke(trained, "--n-tokens", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_missing_checkpoint(trained, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path / "none"), "--tokens",
                                 str(trained["tokens"])])
    assert_one_error_line(result, "checkpoint config not found")


def test_missing_tokenizer(trained, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--checkpoint", str(trained["baseline"]), "--tokens", str(tmp_path)])
    assert_one_error_line(result, "tokenizer not found", "--tokens")


def test_tokenizer_mismatch(trained, tmp_path: Path) -> None:
    other = tmp_path / "tokens"
    other.mkdir()
    text = (trained["tokens"] / TOKENIZER_FILE).read_text(encoding="utf-8")
    (other / TOKENIZER_FILE).write_text(text.replace('"the"', '"teh"'), encoding="utf-8")
    result = runner.invoke(app, ["generate", "--checkpoint", str(trained["baseline"]), "--tokens", str(other)])
    assert_one_error_line(result, "was trained with another tokenizer")


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--temperature", "0", "temperature must be a finite number > 0"),
    ("--temperature", "-1.5", "temperature must be a finite number > 0"),
    ("--top-k", "-1", "top_k must be >= 0"),
    ("--n-tokens", "0", "at least 1"),
])
def test_invalid_sampling_settings(trained, option: str, value: str, fragment: str) -> None:
    assert_one_error_line(invoke(trained, option, value), fragment, value)


def test_top_k_one_is_greedy() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample_next(logits, temperature=5.0, top_k=1, generator=generator).tolist() == [1, 0]


def test_top_k_keeps_only_the_largest_logits() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, temperature=100.0, top_k=2, generator=generator).item() for _ in range(200)}
    assert drawn == {1, 2}


def test_generate_matches_full_forward_sampling(trained) -> None:
    # Sampling from step logits draws the same tokens as sampling from a full forward pass
    # over the text so far, with the same generator.
    from samba.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(trained["samba"])
    prompt = [5, 9, 2]
    new_ids = generate(model, prompt, 8, temperature=0.8, top_k=20, seed=11)
    generator = torch.Generator().manual_seed(11)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids])).logits[:, -1]
            ids.append(int(sample_next(logits, 0.8, 20, generator).item()))
    assert new_ids == ids[len(prompt):]


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    mamba = MambaConfig(vocab_size=40, d_model=16, n_layers=3, d_state=4)
    return MambaLM(mamba) if kind == "baseline" else SambaLM(SambaConfig(mamba=mamba))


@pytest.fixture
def sparse_calls(monkeypatch) -> list[int]:
    """Count the matrix-vector products that take the sparse-input path."""
    calls: list[int] = []
    matvec = sparse_linear.sparse_input_matvec

    def counting_matvec(*args):
        calls.append(1)
        return matvec(*args)

    monkeypatch.setattr(sparse_linear, "sparse_input_matvec", counting_matvec)
    return calls


@pytest.mark.parametrize("kind", ["baseline", "samba"])
@pytest.mark.parametrize("site", ["block_output", "inner"])
def test_sparse_decode_gives_dense_tokens(kind: str, site: str, sparse_calls: list[int]) -> None:
    model = tiny_model(kind)
    install(model, site, "topk", target=0.9)
    dense = generate(model, [4, 7], 24, seed=5)
    assert sparse_calls == []
    sparse = generate(model, [4, 7], 24, seed=5, sparse_site=site)
    # Three linear layers read each site, and 24 tokens take 23 decode steps after the prefill.
    assert len(sparse_calls) == 3 * 23
    assert sparse == dense
    assert not any(isinstance(module, sparse_linear.SparseInputLinear) for module in model.modules())


def with_sparsity(trained: dict[str, Path], tmp_path: Path, **sparsity) -> Path:
    """Copy the trained Samba checkpoint with its config's sparsity section updated."""
    folder = tmp_path / "samba"
    shutil.copytree(trained["samba"], folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["sparsity"].update(sparsity)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def generate_text(trained: dict[str, Path], checkpoint: Path, *args: str):
    params = trained["tokens"].parent / "params.yaml"
    return runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--tokens", str(trained["tokens"]),
                               "--params", str(params), "--prompt", "the company", "--n-tokens", "12",
                               "--seed", "2", *args])


@pytest.mark.parametrize(("method", "site", "reader"), [
    ("topk", "block_output", "backbone.layers.1.mixer.in_proj, backbone.lm_head"),
    ("topk", "inner", "backbone.layers.0.mixer.out_proj, backbone.layers.1.mixer.out_proj"),
    ("magnitude", "block_output", "backbone.layers.1.mixer.in_proj, backbone.lm_head"),
])
def test_cli_sparse_decode_matches_dense(trained, tmp_path: Path, caplog, sparse_calls: list[int],
                                         method: str, site: str, reader: str) -> None:
    checkpoint = with_sparsity(trained, tmp_path, method=method, site=site, target=0.9)
    with caplog.at_level(logging.INFO, logger="pipeline.stages.generate"):
        dense = generate_text(trained, checkpoint, "--dense")
        assert dense.exit_code == 0, dense.output
        assert sparse_calls == []
        sparse = generate_text(trained, checkpoint)
        assert sparse.exit_code == 0, sparse.output
    assert sparse_calls, "no decode step took the sparse-input path"
    assert sparse.stdout == dense.stdout
    messages = [record.getMessage() for record in caplog.records]
    assert "all matmuls run dense: --dense was given" in messages
    assert any(message.startswith(f"sparse-input matmuls ({method} zeros at {site}): {reader}.")
               for message in messages), messages


@pytest.mark.parametrize(("kind", "sparsity"), [
    ("baseline", {}),
    ("samba", {"method": "none", "site": "block_output"}),
    ("samba", {"method": "topk", "site": "ssm_state"}),
])
def test_cli_decodes_dense_without_site_zeros(trained, tmp_path: Path, caplog, sparse_calls: list[int],
                                              kind: str, sparsity: dict) -> None:
    checkpoint = with_sparsity(trained, tmp_path, **sparsity) if sparsity else trained[kind]
    with caplog.at_level(logging.INFO, logger="pipeline.stages.generate"):
        result = generate_text(trained, checkpoint)
    assert result.exit_code == 0, result.output
    assert sparse_calls == []
    messages = [record.getMessage() for record in caplog.records]
    assert "all matmuls run dense: the checkpoint enforces no zeros at block_output or inner" in messages


@pytest.mark.slow
def test_generate_from_pipeline_checkpoint(tiny_project: Path) -> None:
    run(["samba", "tokenize", "--out", "data/tokens"], tiny_project)
    run(["samba", "train", "--kind", "samba", "--out", "models/samba"], tiny_project)
    result = run(["samba", "generate", "--checkpoint", "models/samba", "--prompt", "the market",
                  "--n-tokens", "15", "--seed", "1"], tiny_project)
    assert result.stdout.startswith("the market ")
    assert len(result.stdout.split()) >= 10
