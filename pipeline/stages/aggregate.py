"""Aggregate report over all DVC experiments of the repository: a table, a Pareto plot, heat maps.

The source is `dvc exp show --json --all-commits`, not the MLflow store. DVC holds, for every
commit and experiment ref, the params.yaml and metrics files that dvc.lock vouches for, so the
report covers exactly the completed experiments and regenerates identically later. The MLflow
store also contains failed, interrupted and superseded runs, which suits browsing, not a record.

The comparison is a command to run after a sweep (`samba report --experiments`), not a DVC stage
of its own: a stage's outputs must follow from its declared deps, and the set of experiments is not
one of them. The report stage writes it too when params `report.experiments` is true, into
reports/experiments, but new experiments do not rerun the stage: `dvc repro --force --single-item
report` refreshes the comparison (plain `--force` also reruns every upstream stage, training
included). The stage skips the comparison inside a temporary workspace (`--temp` and queued runs,
under .dvc/tmp/exps), where the other experiments are not visible or are still running, and while
no DVC experiment has results.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from pipeline.params import flatten
from pipeline.stages.report_inputs import EvalMetrics, SplitMetrics

REPORT_NAME = "experiments.md"
TABLE_CSV = "experiments.csv"
PARETO_PNG = "pareto.png"
HEATMAP_PNG = "heatmaps.png"
EVALUATE_FILE = "metrics/evaluate.json"
ALPHA, LAMBDA = "loss.readout_weight", "loss.pruning_weight"
# Param names (last dotted part) shown as table columns whenever a schema has them.
SWEEP_NAMES = ("method", "site")
# Keys that differ between runs without changing what a run computes.
_IGNORED_PREFIXES = ("tracking.", "report.")
# Path parts of the folder below the repository that contains the temporary workspaces of `--temp`
# and queued experiments.
_TEMPORARY_WORKSPACES = (".dvc", "tmp", "exps")

logger = logging.getLogger(__name__)

Split = Literal["valid", "test"]
Source = Literal["experiment", "commit", "workspace"]
_SOURCE_ORDER = {"experiment": 0, "commit": 1, "workspace": 2}


class AggregateError(ValueError):
    """The experiments cannot be read, or none has results; the message names the command to run."""


@dataclass(frozen=True)
class ExperimentResult:
    """One experiment (or commit) with evaluation results."""

    name: str
    rev: str
    source: Source
    params: dict[str, Any]
    evaluation: EvalMetrics

    def split(self, kind: str, split: Split) -> SplitMetrics:
        return getattr(getattr(self.evaluation, kind), split)


@dataclass(frozen=True)
class Skipped:
    """An experiment without results, and why."""

    name: str
    reason: str


@dataclass
class Collected:
    results: list[ExperimentResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def read_experiments(repo: Path) -> list[dict]:
    """Run `dvc exp show --json --all-commits` in repo and return its parsed output."""
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--all-commits"]
    try:
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise AggregateError(f"`dvc exp show` timed out after 600 s in {repo}") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AggregateError(f"`dvc exp show` failed in {repo}: {last} (run it from the repository root)")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise AggregateError(f"`dvc exp show --json` printed invalid JSON ({error})") from None


def _restore_dropped_lists(tree: Any) -> Any:
    """Undo what DVC's metrics reader drops: it keeps scalars only, so list fields vanish.

    The aggregate needs none of those lists, so a histogram without its bins becomes None
    and a matmul table becomes empty.
    """
    if not isinstance(tree, dict):
        return tree
    restored = {key: _restore_dropped_lists(value) for key, value in tree.items()}
    histogram = restored.get("abs_over_rms_histogram")
    if isinstance(histogram, dict) and "log10_edges" not in histogram:
        restored["abs_over_rms_histogram"] = None
    active = restored.get("site_active_params")
    if isinstance(active, dict):
        active.setdefault("matmuls", [])
    return restored


def _evaluation(data: dict) -> EvalMetrics | None:
    payload = (data.get("metrics") or {}).get(EVALUATE_FILE, {}).get("data")
    if not payload:
        return None
    try:
        return EvalMetrics.model_validate(_restore_dropped_lists(payload))
    except ValidationError:
        return None


def _params(data: dict) -> dict[str, Any]:
    return flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})


def _short_rev(rev: str) -> str:
    """Return a commit hash cut to 7 characters; "workspace" stays whole."""
    return rev if rev == "workspace" else rev[:7]


def _entries(show: list[dict]) -> list[tuple[str, str, Source, dict, dict | None]]:
    """Flatten exp show's tree into (name, rev, source, data, executor) per commit and experiment."""
    entries = []
    for baseline in show:
        rev = baseline.get("rev", "")
        source: Source = "workspace" if rev == "workspace" else "commit"
        name = baseline.get("name") or _short_rev(rev)
        entries.append((name, rev, source, baseline.get("data") or {}, None))
        for experiment in baseline.get("experiments") or []:
            revs = experiment.get("revs") or []
            if not revs:
                continue
            latest = revs[0]
            label = experiment.get("name") or latest.get("name") or _short_rev(latest.get("rev", ""))
            entries.append((label, latest.get("rev", ""), "experiment", latest.get("data") or {},
                            experiment.get("executor") or {}))
    return entries


def collect_results(show: list[dict]) -> Collected:
    """Keep every commit and experiment with evaluation results, once each.

    Experiments without results are listed as skipped with their queue state; commits without
    results (the usual case for code-only commits) are left out silently. When a commit or the
    workspace holds the same params and results as an experiment (after `dvc exp apply`), only
    the experiment is kept.
    """
    collected = Collected()
    seen: dict[str, ExperimentResult] = {}
    for name, rev, source, data, executor in _entries(show):
        evaluation = _evaluation(data)
        state = (executor or {}).get("state")
        if evaluation is None:
            if executor is not None:
                collected.skipped.append(Skipped(name, f"{state or 'no results'}, no valid {EVALUATE_FILE}"))
            continue
        if state not in (None, "success"):
            # A failed or unfinished run's ref contains the metrics files of the commit it started from.
            collected.skipped.append(Skipped(name, f"{state}, its {EVALUATE_FILE} is its base commit's"))
            continue
        result = ExperimentResult(name, rev, source, _params(data), evaluation)
        key = json.dumps([result.params, evaluation.model_dump()], sort_keys=True, default=str)
        kept = seen.get(key)
        if kept is None or _SOURCE_ORDER[source] < _SOURCE_ORDER[kept.source]:
            seen[key] = result
    keys = sweep_keys(list(seen.values()))

    def order(result: ExperimentResult) -> tuple:
        groups = tuple(str(result.params.get(key)) for key in keys)
        alpha, lam = result.params.get(ALPHA), result.params.get(LAMBDA)
        return (*groups, float(alpha or 0.0), float(lam or 0.0), result.name)

    collected.results = sorted(seen.values(), key=order)
    return collected


def sweep_keys(results: list[ExperimentResult]) -> list[str]:
    """Return the method/site keys that the params schema has, e.g. `loss.method`."""
    keys = {key for result in results for key in result.params if key.rsplit(".", 1)[-1] in SWEEP_NAMES}
    return sorted(keys)


def varying_keys(results: list[ExperimentResult]) -> list[str]:
    """Return the params, other than α, λ and method/site, whose values differ between results."""
    fixed = {ALPHA, LAMBDA, *sweep_keys(results)}
    keys = sorted({key for result in results for key in result.params})
    varying = []
    for key in keys:
        if key in fixed or key.startswith(_IGNORED_PREFIXES):
            continue
        if len({json.dumps(result.params.get(key), default=str) for result in results}) > 1:
            varying.append(key)
    return varying


def group_label(result: ExperimentResult, keys: list[str]) -> str:
    """Name the group of a result by its values of `keys`, e.g. "loss.method=topk, train.steps=600"."""
    return ", ".join(f"{key}={result.params.get(key)}" for key in keys) or "all runs"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Mark the (sparsity, perplexity) points that no other point beats on both.

    A point is dominated when another has sparsity at least as high and perplexity at least as
    low, and is strictly better on one of them.
    """
    marks = []
    for sparsity, ppl in points:
        dominated = any(
            other_sparsity >= sparsity and other_ppl <= ppl and (other_sparsity > sparsity or other_ppl < ppl)
            for other_sparsity, other_ppl in points
        )
        marks.append(not dominated)
    return marks


def sparsity_of(split: SplitMetrics) -> float:
    """Return the sparsity the Pareto plot uses: near-zero fraction relative to the per-token state RMS."""
    return split.sparsity.overall.near_zero_fraction_relative


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table_rows(results: list[ExperimentResult], split: Split) -> tuple[list[str], list[list[str]]]:
    """Return the header and rows of the comparison table, one row per result."""
    params = [ALPHA, LAMBDA, *sweep_keys(results), *varying_keys(results)]
    front = pareto_front([(sparsity_of(r.split("samba", split)), r.split("samba", split).ppl_token)
                          for r in results])
    header = ["Experiment", "Commit", *params, "Samba ppl", "Baseline ppl", "Samba / baseline ppl",
              "Near zero (relative)", "Exact zeros", "Readout ppl", "Readout accuracy",
              "Active-param reduction", "Pareto"]
    rows = []
    for result, on_front in zip(results, front):
        samba, baseline = result.split("samba", split), result.split("baseline", split)
        readout, active = samba.readout, samba.active_params
        rows.append([
            result.name, _short_rev(result.rev), *(_format(result.params.get(key, "–")) for key in params),
            f"{samba.ppl_token:.2f}", f"{baseline.ppl_token:.2f}", f"{samba.ppl_token / baseline.ppl_token:.3f}",
            f"{100 * sparsity_of(samba):.2f}%", f"{100 * samba.sparsity.overall.exact_zero_fraction:.2f}%",
            f"{readout.ppl_token:.2f}" if readout else "–", f"{100 * readout.accuracy:.2f}%" if readout else "–",
            f"{100 * active.reduction:.2f}%" if active else "–", "yes" if on_front else "",
        ])
    return header, rows


def render_markdown(collected: Collected, split: Split) -> str:
    header, rows = table_rows(collected.results, split)
    lines = [
        "# Samba experiments",
        "",
        f"Runs with results (experiments and commits): {len(collected.results)}, compared on the {split} split. "
        f"α is `{ALPHA}`, λ is `{LAMBDA}`. Sparsity is the share of Samba's state values with "
        "|h| at most the relative threshold times the per-token RMS of the states. "
        "Pareto marks the runs that no other run beats on both perplexity and sparsity.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":--", ":--"] + ["--:"] * (len(header) - 2)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"![Perplexity against sparsity with the Pareto frontier]({PARETO_PNG})",
        "",
        f"![Perplexity and sparsity over α and λ]({HEATMAP_PNG})",
    ]
    if collected.skipped:
        lines += ["", "## Experiments without results", ""]
        lines += [f"- {item.name}: {item.reason}" for item in collected.skipped]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, collected: Collected, split: Split) -> None:
    header, rows = table_rows(collected.results, split)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_files(collected: Collected, out_dir: Path, split: Split) -> Path:
    from pipeline.stages.aggregate_plots import plot_heatmaps, plot_pareto

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_pareto(collected.results, split, out_dir / PARETO_PNG)
    plot_heatmaps(collected.results, split, out_dir / HEATMAP_PNG)
    write_csv(out_dir / TABLE_CSV, collected, split)
    path = out_dir / REPORT_NAME
    path.write_text(render_markdown(collected, split), encoding="utf-8", newline="\n")
    return path


def write_aggregate_report(repo: Path, out_dir: Path, split: Split = "valid",
                           show: list[dict] | None = None) -> Path:
    """Write experiments.md, experiments.csv, pareto.png and heatmaps.png to out_dir; return the .md path.

    `show` is the parsed output of `dvc exp show --json`; when None, it is read from repo.
    """
    collected = collect_results(read_experiments(repo) if show is None else show)
    if not collected.results:
        raise AggregateError(
            f"no commit or experiment in {repo} has a valid {EVALUATE_FILE}: run `dvc exp run` "
            "(or `dvc queue start` for queued experiments) first"
        )
    return _write_files(collected, out_dir, split)


def in_temporary_workspace(repo: Path) -> bool:
    """Return True when repo is the temporary copy of a `--temp` or queued experiment, below .dvc/tmp/exps."""
    parts = repo.resolve().parts
    size = len(_TEMPORARY_WORKSPACES)
    return any(parts[start:start + size] == _TEMPORARY_WORKSPACES for start in range(len(parts) - size + 1))


def write_stage_aggregate(repo: Path, out_dir: Path, split: Split = "valid",
                          show: list[dict] | None = None) -> Path | None:
    """Write the aggregate report for the report stage, or log one line on why it is skipped.

    Skips, returning None, inside a temporary workspace and while no DVC experiment has results.
    Commits and the workspace alone are not compared. Raises AggregateError when
    `dvc exp show` fails.
    """
    if in_temporary_workspace(repo):
        logger.info("skipped the comparison of experiments: this run is in a temporary DVC workspace "
                    "(%s), where the other experiments are not visible or still running; run "
                    "`samba report --experiments` once they finish", repo)
        return None
    collected = collect_results(read_experiments(repo) if show is None else show)
    experiments = sum(result.source == "experiment" for result in collected.results)
    if experiments == 0:
        logger.info("skipped the comparison of experiments: no DVC experiment in %s has a valid %s yet; "
                    "run `dvc exp run`, then `dvc repro --force --single-item report`", repo, EVALUATE_FILE)
        return None
    path = _write_files(collected, out_dir, split)
    logger.info("wrote %s comparing %d DVC %s on the %s split (%d rows with commits and the "
                "workspace); new experiments do not rerun this stage, so run `dvc repro --force "
                "--single-item report` or `samba report --experiments` to refresh it",
                path, experiments, "experiment" if experiments == 1 else "experiments", split,
                len(collected.results))
    return path
