"""The `samba` CLI: help texts and one-line errors for user mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("tokenize", "train", "evaluate", "report"):
        assert command in result.output


@pytest.mark.parametrize("command", ["tokenize", "train", "evaluate", "report"])
def test_command_help_describes_options(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "--params" in result.output
    assert "Folder" in result.output or "folder" in result.output


def test_train_help_names_units():
    result = runner.invoke(app, ["train", "--help"])
    assert "baseline" in result.output
    assert "samba" in result.output


def invoke(args: list[str]):
    return runner.invoke(app, args)


def test_bad_params_key_is_one_line(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("loss:\n  prunning_weight: 0.1\n")
    result = invoke(["tokenize", "--params", str(params), "--out", str(tmp_path / "tokens")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "loss.prunning_weight" in result.output
    assert "did you mean 'pruning_weight'" in result.output


def test_hub_unreachable_names_key(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: hub\n")
    result = invoke(["tokenize", "--params", str(params), "--out", str(tmp_path / "tokens")])
    assert result.exit_code == 2
    assert "data.local_dir" in result.output
    assert "Traceback" not in result.output


def test_missing_tokens_for_train(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("")
    result = invoke(["train", "--kind", "baseline", "--params", str(params), "--tokens", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "tokenized data not found" in result.output
    assert "samba tokenize" in result.output


def test_missing_local_folder(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: local\n  local_dir: {tmp_path / 'nothing'}\n")
    result = invoke(["tokenize", "--params", str(params), "--out", str(tmp_path / "tokens")])
    assert result.exit_code == 2
    assert "nothing" in result.output


def test_report_without_metrics(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("")
    result = invoke(["report", "--params", str(params), "--metrics-dir", str(tmp_path), "--plots-dir", str(tmp_path),
                     "--out", str(tmp_path / "reports")])
    assert result.exit_code == 2
    assert "not found" in result.output
    assert "dvc repro train_baseline" in result.output
