"""The train and evaluate stages with each enforcement method, on real PTB text, in-process."""

from __future__ import annotations

from pathlib import Path

import json

import pytest

from conftest import TINY_PARAMS, REPO_ROOT
from pipeline.params import Params, read_yaml
from pipeline.stages.evaluate import run_evaluate
from pipeline.stages.tokenize import run_tokenize
from pipeline.stages.train import TrainOutputs, run_train

pytestmark = pytest.mark.slow


def tiny_params(ptb_dir: Path, **sparsity) -> Params:
    raw = read_yaml(REPO_ROOT / "params.yaml")
    for section, values in read_yaml(TINY_PARAMS).items():
        raw[section].update(values)
    raw["data"]["local_dir"] = str(ptb_dir)
    raw["tracking"]["enabled"] = False
    raw["train"]["steps"] = 4
    raw["sparsity"].update(sparsity, sweep=[0.8])
    return Params.model_validate(raw)


@pytest.mark.parametrize(("method", "site"), [("magnitude", "block_output"), ("topk", "inner"), ("none", "ssm_state")])
def test_stages_apply_method_zeros(tmp_path: Path, ptb_dir: Path, method: str, site: str):
    params = tiny_params(ptb_dir, method=method, site=site, target=0.75, penalty="l1_rms")
    run_tokenize(params, tmp_path / "tokens")
    for kind in ("baseline", "samba"):
        outputs = TrainOutputs(checkpoint=tmp_path / kind, metrics=tmp_path / f"train_{kind}.json",
                               timing=tmp_path / f"timing_{kind}.json", curve=tmp_path / f"train_{kind}.csv")
        run_train(params, kind, tmp_path / "tokens", outputs, checkpoint_dir=tmp_path / "state" / kind)
    report = run_evaluate(params, tmp_path / "tokens", tmp_path / "baseline", tmp_path / "samba",
                          tmp_path / "evaluate.json")

    samba = report["samba"]
    assert samba["sparsity_method"]["zeros_applied"] == (method != "none")
    assert samba["test"]["sparsity"]["site"] == site
    zeros = samba["valid"]["sparsity"]["overall"]["exact_zero_fraction"]
    if method == "topk":
        assert zeros == pytest.approx(0.75, abs=0.02)
    elif method == "magnitude":
        # Calibrated on the first 1024 validation tokens, measured on 2000.
        assert zeros == pytest.approx(0.75, abs=0.05)
    assert [(point["method"], point["target"]) for point in samba["sweep"]] == [("magnitude", 0.8), ("topk", 0.8)]
    assert report["baseline"]["sparsity_method"]["zeros_applied"] is False
    assert report["baseline"]["test"]["sparsity"]["site"] == site

    # The site's readers were timed dense and sparse, outside the reproducible metrics.
    speed = json.loads((tmp_path / "speed_samba.json").read_text(encoding="utf-8"))
    assert "speed" not in samba
    assert speed["measured"] == (method != "none")
    if method != "none":
        names = [matmul["name"] for matmul in speed["matmuls"]]
        expected = {"inner": "backbone.layers.0.mixer.out_proj", "block_output": "backbone.lm_head"}[site]
        assert expected in names
        assert all(matmul["speedup"] > 0 for matmul in speed["matmuls"])

