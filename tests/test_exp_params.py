"""Values written by `dvc exp run -S` (DVC's own override writer) load back through the params schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from pipeline.params import Params, ParamsError, load_params, read_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOAT_KEYS = sorted(key for key, value in Params().flat().items() if isinstance(value, float))


def override_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy2(REPO_ROOT / "params.yaml", path)
    return path


def test_every_key_round_trips(params_file):
    expected = load_params(params_file).flat()
    for key, value in expected.items():
        apply_overrides(str(params_file), [f"{key}={override_text(value)}"])
    assert load_params(params_file).flat() == expected


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_small_float_override_is_float(params_file, key):
    apply_overrides(str(params_file), [f"{key}=1e-07"])
    leaf = key.rsplit(".", 1)[-1]
    assert f"{leaf}: 1e-07" in params_file.read_text(encoding="utf-8")
    section, name = key.split(".")
    assert read_yaml(params_file)[section][name] == 1e-07
    try:
        loaded = load_params(params_file).flat()[key]
    except ParamsError as error:
        # A range rule (such as min_lr <= lr) may reject the value, but never its type.
        assert "valid number" not in str(error)
        assert "1e-07" in str(error) or "must not exceed" in str(error)
    else:
        assert loaded == 1e-07
