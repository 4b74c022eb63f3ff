"""Stage inputs must be tracked by git or DVC, and params.yaml must not change while a stage runs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO_ROOT, run, write_params
from pipeline.cli import app
from pipeline.errors import StageError
from pipeline.workspace import check_tracked_inputs, stage_param_keys

SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git + DVC repository with an untracked corpus folder, as the cwd of the test."""
    project = tmp_path / "repo"
    project.mkdir()
    shutil.copy2(REPO_ROOT / "dvc.yaml", project / "dvc.yaml")
    corpus = project / "corpus"
    corpus.mkdir()
    for name in SPLIT_FILES:
        (corpus / name).write_text(" the cat sat on the mat \n", encoding="utf-8")
    run(["git", "init", "-q", "-b", "main"], project)
    run(["dvc", "init", "-q"], project)
    for name in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(project)
    return project


def corpus_files(repo: Path) -> list[Path]:
    return [repo / "corpus" / name for name in SPLIT_FILES]


def test_untracked_corpus_rejected(repo):
    with pytest.raises(StageError) as raised:
        check_tracked_inputs(corpus_files(repo), "data.local_dir")
    message = str(raised.value)
    assert "corpus/train.txt is neither in git nor tracked by DVC" in message
    assert "`dvc add corpus`" in message
    assert "\n" not in message


def test_git_tracked_corpus_accepted(repo):
    run(["git", "add", "corpus"], repo)
    check_tracked_inputs(corpus_files(repo), "data.local_dir")


def test_partly_git_tracked_corpus_rejected(repo):
    run(["git", "add", "corpus/train.txt", "corpus/valid.txt"], repo)
    with pytest.raises(StageError, match="corpus/test.txt is neither in git nor tracked by DVC"):
        check_tracked_inputs(corpus_files(repo), "data.local_dir")


def test_dvc_tracked_corpus_accepted(repo):
    run(["dvc", "add", "-q", "corpus"], repo)
    check_tracked_inputs(corpus_files(repo), "data.local_dir")


def test_corpus_outside_repository_accepted(repo, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    files = [outside / name for name in SPLIT_FILES]
    for file in files:
        file.write_text("x\n", encoding="utf-8")
    check_tracked_inputs(files, "data.local_dir")


def test_missing_corpus_left_to_loader(repo):
    check_tracked_inputs([repo / "no-such-folder" / name for name in SPLIT_FILES], "data.local_dir")


def test_stage_param_keys_read_dvc_yaml():
    keys = stage_param_keys("tokenize", REPO_ROOT / "dvc.yaml")
    assert "data.local_dir" in keys
    assert "tokenizer.vocab_size" in keys
    assert not any(key.startswith("train.") for key in keys)
    assert stage_param_keys("no_such_stage", REPO_ROOT / "dvc.yaml") is None


class EditParamsOnLog(logging.Handler):
    """Rewrite params.yaml when the tokenize stage logs its corpus, i.e. after it loaded params."""

    def __init__(self, path: Path, ptb_dir: Path, overrides: dict) -> None:
        super().__init__()
        self.path, self.ptb_dir, self.overrides = path, ptb_dir, overrides

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("corpus:"):
            write_params(self.path, self.ptb_dir, **self.overrides)


def tokenize_while_editing(project: Path, ptb_dir: Path, overrides: dict):
    write_params(project / "params.yaml", ptb_dir)
    handler = EditParamsOnLog(project / "params.yaml", ptb_dir, overrides)
    stage_logger = logging.getLogger("pipeline.stages.tokenize")
    level = stage_logger.level
    stage_logger.addHandler(handler)
    stage_logger.setLevel(logging.INFO)
    try:
        return CliRunner().invoke(app, ["tokenize", "--out", str(project / "tokens")])
    finally:
        stage_logger.removeHandler(handler)
        stage_logger.setLevel(level)


def test_params_edit_during_stage_fails(tmp_path, monkeypatch, ptb_dir):
    shutil.copy2(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "tokenize")
    result = tokenize_while_editing(tmp_path, ptb_dir, {"data": {"max_rows": 300}})
    assert result.exit_code == 2, result.output
    assert "changed while stage 'tokenize' ran (data.max_rows: 400 -> 300)" in result.output
    assert "rerun the stage" in result.output


def test_params_edit_outside_stage_keys_passes(tmp_path, monkeypatch, ptb_dir):
    shutil.copy2(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "tokenize")
    result = tokenize_while_editing(tmp_path, ptb_dir, {"train": {"steps": 99}})
    assert result.exit_code == 0, result.output


def test_params_edit_outside_dvc_not_checked(tmp_path, monkeypatch, ptb_dir):
    shutil.copy2(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    result = tokenize_while_editing(tmp_path, ptb_dir, {"data": {"max_rows": 300}})
    assert result.exit_code == 0, result.output
