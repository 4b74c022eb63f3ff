"""The aggregate experiments report: Pareto frontier, collection from `dvc exp show --json`, files, CLI."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.stages.aggregate import (
    AggregateError,
    collect_results,
    in_temporary_workspace,
    pareto_front,
    render_markdown,
    table_rows,
    write_aggregate_report,
    write_stage_aggregate,
)
from test_report import make_evaluation, write_inputs

BASE_REV = "c0ffee" + "0" * 34
AGGREGATE_FILES = ("experiments.md", "experiments.csv", "pareto.png", "heatmaps.png")
AGGREGATE_LOGGER = "pipeline.stages.aggregate"


def evaluation(ppl: float, near_zero: float) -> dict:
    """Return evaluate.json contents whose Samba valid split has this perplexity and sparsity."""
    result = make_evaluation()
    split = result["samba"]["valid"]
    split["ppl_token"] = ppl
    split["sparsity"]["overall"]["near_zero_fraction_relative"] = near_zero
    return result


def data(alpha: float, lam: float, metrics: dict | None, **sections: dict) -> dict:
    params = {"loss": {"readout_weight": alpha, "pruning_weight": lam}, "train": {"steps": 12},
              "tracking": {"experiment": "samba"}}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    files = {"metrics/evaluate.json": {"data": metrics}} if metrics is not None else {}
    return {"params": {"params.yaml": {"data": params}}, "metrics": files}


def experiment(name: str, rev: str, entry: dict, state: str = "success") -> dict:
    return {"name": name, "executor": {"state": state}, "revs": [{"rev": rev, "name": name, "data": entry}]}


def exp_show(experiments: list[dict], workspace: dict | None = None, commit: dict | None = None) -> list[dict]:
    """Build `dvc exp show --json` output: the workspace, then one commit with its experiments."""
    return [
        {"rev": "workspace", "name": None, "data": workspace or {}, "experiments": None},
        {"rev": BASE_REV, "name": "main", "data": commit or {}, "experiments": experiments},
    ]


@pytest.fixture
def sweep() -> list[dict]:
    return exp_show([
        experiment("weak", "a" * 40, data(0.5, 0.01, evaluation(150.0, 0.20))),
        experiment("strong", "b" * 40, data(0.5, 0.3, evaluation(180.0, 0.60))),
        experiment("worse", "c" * 40, data(0.25, 0.3, evaluation(190.0, 0.50))),
        experiment("waiting", "d" * 40, data(0.25, 0.01, None), state="queued"),
        experiment("broken", "e" * 40, data(0.25, 0.1, None), state="failed"),
    ], workspace=data(0.5, 0.3, evaluation(180.0, 0.60)))


@pytest.mark.parametrize(("points", "expected"), [
    ([(0.1, 100.0)], [True]),
    ([(0.1, 100.0), (0.5, 120.0), (0.3, 130.0)], [True, True, False]),
    ([(0.5, 120.0), (0.5, 110.0)], [False, True]),
    ([(0.1, 100.0), (0.1, 100.0)], [True, True]),
    ([(0.2, 100.0), (0.1, 90.0), (0.3, 95.0)], [False, True, True]),
])
def test_pareto_front(points, expected):
    assert pareto_front(points) == expected


def test_collect_keeps_results_once(sweep):
    collected = collect_results(sweep)
    names = [result.name for result in collected.results]
    assert sorted(names) == ["strong", "weak", "worse"]
    assert [(item.name, item.reason) for item in collected.skipped] == [
        ("waiting", "queued, no valid metrics/evaluate.json"),
        ("broken", "failed, no valid metrics/evaluate.json"),
    ]


def test_collect_skips_failed_run_with_base_metrics(sweep):
    # A killed queued run keeps the metrics files of the commit it started from, with its own params.
    sweep[1]["experiments"].append(experiment("killed", "c" * 40, data(1.0, 0.01, evaluation(175.0, 0.1)), "failed"))
    collected = collect_results(sweep)
    assert "killed" not in [result.name for result in collected.results]
    assert ("killed", "failed, its metrics/evaluate.json is its base commit's") in [
        (item.name, item.reason) for item in collected.skipped]


def test_collect_keeps_unique_commit(sweep):
    sweep[1]["data"] = data(0.5, 0.1, evaluation(160.0, 0.40))
    results = collect_results(sweep).results
    commit = next(result for result in results if result.source == "commit")
    assert commit.name == "main"
    assert commit.rev == BASE_REV


def test_table_names_workspace_whole(sweep):
    sweep[0]["data"] = data(0.25, 0.2, evaluation(170.0, 0.50))
    header, rows = table_rows(collect_results(sweep).results, "valid")
    (row,) = [dict(zip(header, row)) for row in rows if row[0] == "workspace"]
    assert row["Commit"] == "workspace"


def test_collect_skips_invalid_metrics(sweep):
    broken = copy.deepcopy(sweep)
    broken[1]["experiments"][0]["revs"][0]["data"]["metrics"]["metrics/evaluate.json"]["data"]["samba"] = {}
    names = [result.name for result in collect_results(broken).results]
    assert "weak" not in names


def test_table_marks_pareto_and_sweep_keys(sweep):
    header, rows = table_rows(collect_results(sweep).results, "valid")
    by_name = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_name["weak"]["Pareto"] == "yes"
    assert by_name["strong"]["Pareto"] == "yes"
    assert by_name["worse"]["Pareto"] == ""
    assert by_name["strong"]["loss.pruning_weight"] == "0.3"
    assert by_name["strong"]["Samba ppl"] == "180.00"
    assert by_name["strong"]["Near zero (relative)"] == "60.00%"
    assert by_name["strong"]["Baseline ppl"] == "125.46"
    assert "train.steps" not in header
    assert "tracking.experiment" not in header


def test_table_shows_method_site_and_varying(sweep):
    entries = sweep[1]["experiments"]
    entries[0]["revs"][0]["data"] = data(0.5, 0.01, evaluation(150.0, 0.20), sparsity={"method": "topk", "site": "inner"},
                                         train={"steps": 99})
    entries[1]["revs"][0]["data"] = data(0.5, 0.3, evaluation(180.0, 0.60), sparsity={"method": "l1", "site": "inner"})
    header, _ = table_rows(collect_results(sweep).results, "valid")
    assert header[2:7] == ["loss.readout_weight", "loss.pruning_weight", "sparsity.method", "sparsity.site",
                           "train.steps"]


def test_markdown_lists_skipped(sweep):
    text = render_markdown(collect_results(sweep), "valid")
    assert "| strong | bbbbbbb |" in text
    assert "- waiting: queued, no valid metrics/evaluate.json" in text
    assert "](pareto.png)" in text
    assert "](heatmaps.png)" in text


def test_report_files_byte_identical(sweep, tmp_path):
    first = write_aggregate_report(tmp_path, tmp_path / "first", "valid", show=sweep).parent
    second = write_aggregate_report(tmp_path, tmp_path / "second", "valid", show=sweep).parent
    for name in ("experiments.md", "experiments.csv", "pareto.png", "heatmaps.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "pareto.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (first / "experiments.csv").read_text(encoding="utf-8").count("\n") == 4


def test_report_without_results_raises(tmp_path):
    show = exp_show([experiment("waiting", "d" * 40, data(0.25, 0.01, None), state="queued")])
    with pytest.raises(AggregateError, match="run `dvc exp run`"):
        write_aggregate_report(tmp_path, tmp_path / "out", "valid", show=show)
    assert not (tmp_path / "out").exists()


def test_cli_outside_repository_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "--experiments"])
    assert result.exit_code == 2
    assert "error: `dvc exp show` failed in" in result.output
    assert not Path(tmp_path / "experiments").exists()


def test_evaluation_without_dvc_dropped_lists():
    """DVC's metrics reader keeps scalars only; the aggregate must still accept such a payload."""
    from pipeline.stages.aggregate import _evaluation

    histogram = {"exact_zeros": 3}
    active = {"total": 10, "active": 5.0, "reduction": 0.5}
    payload = {"abs_over_rms_histogram": histogram, "nested": {"site_active_params": active}}
    from pipeline.stages.aggregate import _restore_dropped_lists

    restored = _restore_dropped_lists(payload)
    assert restored["abs_over_rms_histogram"] is None
    assert restored["nested"]["site_active_params"]["matmuls"] == []
    assert _evaluation({"metrics": {}}) is None


@pytest.mark.parametrize(("parts", "expected"), [
    (("project",), False),
    (("project", ".dvc", "tmp", "exps", "tmpab12cd"), True),
    (("project", ".dvc", "tmp", "exps", "celery", "tmpab12cd", "sub"), True),
    (("project", ".dvc", "tmp"), False),
    (("project", "tmp", "exps"), False),
])
def test_temporary_workspace_detected(tmp_path, parts, expected):
    assert in_temporary_workspace(tmp_path.joinpath(*parts)) is expected


def test_stage_aggregate_writes_and_logs(sweep, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=AGGREGATE_LOGGER)
    out_dir = tmp_path / "reports" / "experiments"
    path = write_stage_aggregate(tmp_path, out_dir, "valid", show=sweep)
    assert path == out_dir / "experiments.md"
    for name in AGGREGATE_FILES:
        assert (out_dir / name).is_file(), name
    (record,) = caplog.records
    message = record.getMessage()
    assert "comparing 3 DVC experiments on the valid split" in message
    assert "new experiments do not rerun this stage" in message
    assert "dvc repro --force --single-item report" in message


def test_stage_aggregate_skips_temporary_workspace(sweep, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=AGGREGATE_LOGGER)
    repo = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert write_stage_aggregate(repo, repo / "reports" / "experiments", "valid", show=sweep) is None
    assert not (repo / "reports").exists()
    (record,) = caplog.records
    assert "skipped the comparison of experiments" in record.getMessage()
    assert "temporary DVC workspace" in record.getMessage()


def test_stage_aggregate_skips_without_experiments(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=AGGREGATE_LOGGER)
    # Only the workspace has results: nothing to compare it with yet.
    show = exp_show([experiment("waiting", "d" * 40, data(0.25, 0.01, None), state="queued")],
                    workspace=data(0.5, 0.1, evaluation(150.0, 0.20)))
    assert write_stage_aggregate(tmp_path, tmp_path / "out", "valid", show=show) is None
    assert not (tmp_path / "out").exists()
    (record,) = caplog.records
    assert "no DVC experiment" in record.getMessage()


def test_table_ignores_report_params(sweep):
    sweep[1]["experiments"][0]["revs"][0]["data"] = data(0.5, 0.01, evaluation(150.0, 0.20),
                                                         report={"experiments": True})
    header, _ = table_rows(collect_results(sweep).results, "valid")
    assert "report.experiments" not in header


def report_command(tmp_path: Path, params_text: str) -> list[str]:
    """Return `samba report` arguments for per-run inputs in tmp_path and a params.yaml with params_text."""
    metrics_dir, plots_dir = write_inputs(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(params_text, encoding="utf-8")
    return ["report", "--params", str(params), "--metrics-dir", str(metrics_dir),
            "--plots-dir", str(plots_dir), "--out", str(tmp_path / "reports")]


def test_report_stage_default_writes_no_comparison(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, report_command(tmp_path, "report:\n  experiments: false\n"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reports" / "report.md").is_file()
    assert not (tmp_path / "reports" / "experiments").exists()


def test_report_stage_skips_in_temporary_workspace(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=AGGREGATE_LOGGER)
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    workspace.mkdir(parents=True)
    (workspace / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    monkeypatch.chdir(workspace)
    result = CliRunner().invoke(app, report_command(workspace, "report:\n  experiments: true\n"))
    assert result.exit_code == 0, result.output
    assert (workspace / "reports" / "report.md").is_file()
    assert not (workspace / "reports" / "experiments").exists()
    assert any("temporary DVC workspace" in record.getMessage() for record in caplog.records)


def test_report_stage_outside_repository_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, report_command(tmp_path, "report:\n  experiments: true\n"))
    assert result.exit_code == 2
    assert "error: `dvc exp show` failed in" in result.output
    assert "set report.experiments: false to skip the comparison" in result.output
    assert not (tmp_path / "reports" / "experiments").exists()
