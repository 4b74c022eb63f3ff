"""The whole DVC pipeline on real PTB text in a temporary git repo: dvc repro, exp run, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run
from pipeline.tracking import tracking_uri

pytestmark = pytest.mark.slow

OUTPUTS = (
    "data/tokens/tokens.safetensors",
    "data/tokens/tokenizer.json",
    "models/baseline/model.safetensors",
    "models/samba/model.safetensors",
    "metrics/train_baseline.json",
    "metrics/train_samba.json",
    "metrics/evaluate.json",
    "plots/train_baseline.csv",
    "plots/train_samba.csv",
    "reports/report.md",
    "reports/training_curves.png",
)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_repro_exp_run_and_mlflow(tiny_project: Path):
    project = tiny_project
    run(["dvc", "repro"], project)
    for name in OUTPUTS:
        assert (project / name).is_file(), f"{name} missing after dvc repro"

    evaluation = read_json(project / "metrics/evaluate.json")
    assert evaluation["corpus"]["source"] == "local"
    for kind in ("baseline", "samba"):
        for split in ("valid", "test"):
            metrics = evaluation[kind][split]
            assert 1.0 < metrics["ppl_token"] < 500, (kind, split, metrics["ppl_token"])
            assert metrics["ppl_word"] == pytest.approx(metrics["ppl_token"])  # word-level tokens are words
    assert 0.0 <= evaluation["samba"]["test"]["readout"]["accuracy"] <= 1.0
    assert 0.0 < evaluation["samba"]["test"]["active_params"]["active_fraction"] <= 1.0
    report = (project / "reports/report.md").read_text(encoding="utf-8")
    assert "near zero" in report

    # Checkpoints and token ids are DVC outputs, ignored by git.
    ignored = run(["git", "check-ignore", "models/samba", "data/tokens"], project).stdout.split()
    assert ignored == ["models/samba", "data/tokens"]

    second = run(["dvc", "repro"], project).stdout
    assert "up to date" in second
    assert "Running stage" not in second
    assert "up to date" in run(["dvc", "status"], project).stdout

    client = MlflowClient(tracking_uri(project))
    experiment = client.get_experiment_by_name("samba-tiny")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == ["evaluate_baseline", "evaluate_samba", "train_baseline", "train_samba"]
    train_samba = next(r for r in runs if r.info.run_name == "train_samba")
    assert train_samba.data.tags["model.kind"] == "samba"
    assert train_samba.data.params["loss.pruning_weight"] == "0.1"
    history = client.get_metric_history(train_samba.info.run_id, "loss_pruning")
    assert [m.step for m in history] == [4, 8, 12]
    for key in ("loss_main", "loss_readout", "loss_total", "lr", "tokens_per_s"):
        assert client.get_metric_history(train_samba.info.run_id, key), key

    # An experiment with other alpha and lambda retrains Samba only and changes its metrics.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "Record the tiny run"], project)
    output = run(["dvc", "exp", "run", "-n", "strong-l1", "-S", "loss.readout_weight=1.0",
                  "-S", "loss.pruning_weight=1e-07"], project).stdout
    assert "Stage 'train_baseline' didn't change, skipping" in output
    assert "Running stage 'train_samba'" in output
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    text = json.dumps(shown)
    assert "strong-l1" in text
    changed = read_json(project / "metrics/evaluate.json")
    assert changed["samba"]["test"]["ppl_token"] != evaluation["samba"]["test"]["ppl_token"]
    assert changed["baseline"]["test"] == evaluation["baseline"]["test"]

    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`dvc.experiment` = 'strong-l1'")
    assert "train_samba" in {r.info.run_name for r in runs}
    strong = next(r for r in runs if r.info.run_name == "train_samba")
    assert float(strong.data.params["loss.pruning_weight"]) == pytest.approx(1e-7)
