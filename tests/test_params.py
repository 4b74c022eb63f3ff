"""params.yaml schema: defaults, YAML 1.2 numbers, one-line errors, dvc.yaml keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.params import Params, ParamsError, load_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_repository_params_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.loss.readout_weight == 0.5
    assert params.loss.pruning_weight == 0.1
    assert params.data.source == "hub"
    assert params.data.hub_name == "Salesforce/wikitext"
    assert params.data.hub_config == "wikitext-2-raw-v1"


def test_params_yaml_sets_every_schema_key():
    raw = YAML(typ="safe").load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    from pipeline.params import flatten

    assert set(flatten(raw)) == set(Params().flat())


def test_dvc_yaml_params_exist_in_schema():
    dvc = YAML(typ="safe").load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    known = set(Params().flat())
    listed = [key for stage in dvc["stages"].values() for key in stage.get("params", [])]
    assert listed, "dvc.yaml lists no params"
    for key in listed:
        assert key in known, f"dvc.yaml names {key}, which the schema does not define"


@pytest.mark.parametrize("text", ["1e-07", "1.0e-7", "1e-7"])
def test_exponent_without_dot_is_float(tmp_path, text):
    params = load_params(write(tmp_path, f"loss:\n  pruning_weight: {text}\n"))
    assert params.loss.pruning_weight == pytest.approx(1e-7)
    assert isinstance(params.loss.pruning_weight, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("loss:\n  prunning_weight: 0.1\n", ["loss.prunning_weight", "did you mean 'pruning_weight'"]),
        ("lss:\n  readout_weight: 0.1\n", ["'lss'", "did you mean 'loss'"]),
        ("data:\n  source: web\n", ["data.source", "'hub', 'local' or 'synthetic'"]),
        ("tokenizer:\n  kind: char\n", ["tokenizer.kind", "'word' or 'bpe'"]),
        ("model:\n  d_model: 0\n", ["model.d_model", "it must be greater than 0"]),
        ("model:\n  n_layers: -2\n", ["model.n_layers", "greater than 0"]),
        ("train:\n  lr: fast\n", ["train.lr", "valid number"]),
        ("loss:\n  pruning_weight: -1\n", ["loss.pruning_weight", "greater than or equal to 0"]),
        ("loss:\n  readout_weight: .nan\n", ["loss.readout_weight"]),
        ("data:\n  source: local\n", ["data", "data.local_dir"]),
        ("train:\n  lr: 0.001\n  min_lr: 0.01\n", ["train", "min_lr"]),
        ("- a\n- b\n", ["mapping of sections"]),
        ("data: [\n", ["not valid YAML"]),
    ],
)
def test_invalid_params_give_one_line(tmp_path, text, expected):
    with pytest.raises(ParamsError) as raised:
        load_params(write(tmp_path, text))
    message = str(raised.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")


def test_empty_file_gives_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == Params()


def test_flat_uses_dotted_keys():
    flat = Params().flat()
    assert flat["loss.pruning_weight"] == 0.1
    assert flat["model.d_model"] == 128
    assert all("." in key for key in flat)
