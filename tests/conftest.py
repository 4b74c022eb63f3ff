"""Shared fixtures: the real corpora folder and a tiny DVC project in a temporary git repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_PARAMS = Path(__file__).resolve().parent / "fixtures" / "params_tiny.yaml"
# Copied into the temporary project: what dvc.yaml lists as code dependencies.
PROJECT_FILES = ("dvc.yaml", "pyproject.toml", "samba", "pipeline")


def shared_data_dir() -> Path:
    return Path(os.environ.get("SAMBA_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = shared_data_dir()
    if not (folder / "ptb" / "train.txt").is_file():
        pytest.skip(f"real corpora not found in {folder}; set SAMBA_TEST_DATA to the folder with ptb/")
    return folder


@pytest.fixture(scope="session")
def ptb_dir(data_dir: Path) -> Path:
    return data_dir / "ptb"


def tool_env() -> dict[str, str]:
    """Return an environment whose PATH finds this interpreter's `samba` and `dvc` scripts."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "Samba Tests"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "tests@example.invalid"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run(command: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a real command; on failure show its output in the assertion message."""
    result = subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def write_params(path: Path, local_dir: Path, **overrides: dict) -> None:
    """Write the repository's params.yaml with the tiny profile and `overrides` laid over it.

    DVC requires every key a stage lists to be present, so the profile is an overlay
    on the full file rather than a file of its own.
    """
    yaml = YAML()
    params = yaml.load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    tiny = yaml.load(TINY_PARAMS.read_text(encoding="utf-8"))
    tiny["data"]["local_dir"] = str(local_dir)
    for layer in (tiny, overrides):
        for section, values in layer.items():
            params[section].update(values)
    with path.open("w", encoding="utf-8") as handle:
        yaml.dump(params, handle)


@pytest.fixture
def tiny_project(tmp_path: Path, ptb_dir: Path) -> Path:
    """A git + DVC repository with the project's code, dvc.yaml and the tiny params profile."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, project / name)
    (project / ".gitignore").write_text("/mlflow.db*\n/mlruns/\n__pycache__/\n", encoding="utf-8")
    write_params(project / "params.yaml", ptb_dir)
    run(["git", "init", "-q", "-b", "main"], project)
    run(["dvc", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "Set up tiny project"], project)
    return project
