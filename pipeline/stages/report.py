"""Report stage: compare the baseline and Samba in reports/report.md, with PNG plots beside it.

The report contains no timestamps or absolute paths, so the same inputs give a byte-identical
report.md (and, with the same matplotlib, byte-identical PNGs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.stages.report_inputs import (
    KINDS,
    EvalMetrics,
    ReportInputError,
    ReportInputs,
    SplitMetrics,
    Sparsity,
    TrainMetrics,
    layer_index,
    load_report_inputs,
)
from pipeline.stages.report_plots import plot_sparsity_per_layer, plot_training_curves
from pipeline.stages import report_sparsity

__all__ = ["ReportInputError", "write_report"]

REPORT_NAME = "report.md"
CURVES_PNG = "training_curves.png"
SPARSITY_PNG = "sparsity_per_layer.png"
NOT_APPLICABLE = "–"

_TOKENIZER_NAMES = {"word": "word-level", "bpe": "BPE"}
_SPLITS = ("valid", "test")


def percent(fraction: float, decimals: int = 2) -> str:
    return f"{100.0 * fraction:.{decimals}f}%"


def perplexity(value: float) -> str:
    return f"{value:.1f}"


def count(value: float) -> str:
    return f"{value:,.0f}"


def duration(seconds: float) -> str:
    """Format a duration in the largest unit that keeps the number readable."""
    if seconds < 120.0:
        return f"{seconds:.1f} s"
    if seconds < 7200.0:
        return f"{seconds / 60.0:.1f} min"
    return f"{seconds / 3600.0:.2f} h"


def _table(header: list[str], rows: list[list[str]], left_columns: int = 1) -> list[str]:
    align = [":--"] * left_columns + ["--:"] * (len(header) - left_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _header(evaluation: EvalMetrics) -> list[str]:
    corpus = evaluation.corpus
    lines = [
        "# Samba vs dense Mamba baseline",
        "",
        f"**Corpus:** {corpus.description}, source `{corpus.source}`, "
        f"{_TOKENIZER_NAMES[corpus.tokenizer]} tokenizer, vocabulary of {count(corpus.vocab_size)} tokens.",
    ]
    if corpus.source == "synthetic":
        lines += [
            "",
            "> **Warning:** these numbers come from a generated smoke-test corpus, not from real text, "
            "so they are not comparable with published results.",
        ]
    return lines


def _headlines(evaluation: EvalMetrics) -> list[str]:
    """Write the three headline sentences from the test split."""
    baseline, samba = evaluation.baseline.test, evaluation.samba.test
    dense, sparse = baseline.sparsity.overall, samba.sparsity.overall
    method = evaluation.samba.sparsity_method
    site = method.site if method is not None else "ssm_state"
    values, symbol = ("the states", "|h|") if site == "ssm_state" else (f"the {site} values", "|v|")
    relative_to_baseline = baseline.ppl_token / samba.ppl_token
    return [
        "## Headline results (test split)",
        "",
        f"- **{percent(sparse.exact_zero_fraction, 1)} of Samba's sparsity-site values are exactly zero**, "
        f"the only values a matmul can skip. "
        f"{percent(sparse.near_zero_fraction_relative, 1)} have "
        f"{symbol} ≤ {evaluation.thresholds.relative:g} × the per-token RMS of {values}, exact zeros included; "
        f"the small values that are not exactly 0 are shrinkage, not sparsity. "
        f"The dense baseline has {percent(dense.exact_zero_fraction, 1)} exactly zero "
        f"and {percent(dense.near_zero_fraction_relative, 1)} near zero.",
        f"- **Samba reaches {percent(relative_to_baseline, 1)} of the baseline's performance**, "
        f"measured as baseline perplexity over Samba perplexity per token "
        f"({perplexity(baseline.ppl_token)} / {perplexity(samba.ppl_token)}).",
        _active_headline(samba, site),
    ]


def _active_headline(samba: SplitMetrics, site: str) -> str:
    """Write the active-parameter sentence for the matmuls that read the sparsity site."""
    if site == "ssm_state" or samba.site_active_params is None:
        active = samba.active_params
        return (f"- **{percent(active.reduction, 1)} reduction in active parameters.** "
                f"Samba uses on average {count(active.active)} of its {count(active.total)} parameters per token, "
                f"because the readout skips the input weight columns of state entries that are zero for that token "
                f"({percent(active.readout_input_active_fraction, 1)} of those columns stay active).")
    active = samba.site_active_params
    readers = ", ".join(f"{matmul.name} ({percent(matmul.active_column_fraction, 1)} of columns active)"
                        for matmul in active.matmuls)
    sentence = (f"- **{percent(active.reduction, 1)} reduction in active parameters.** "
                f"Samba uses on average {count(active.active)} of its {count(active.total)} parameters per token, "
                f"because the matmuls that read the {site} values skip the weight columns of inputs that are "
                f"zero for that token: {readers}.")
    if any(not matmul.counted for matmul in active.matmuls):
        sentence += " The tied LM head shares the embedding table's weight, so its idle columns are not subtracted."
    return sentence


def _split_rows(evaluation: EvalMetrics) -> list[tuple[str, Callable[[str, SplitMetrics], str]]]:
    relative, absolute = evaluation.thresholds.relative, evaluation.thresholds.absolute

    def readout(render: Callable[[SplitMetrics], str]) -> Callable[[str, SplitMetrics], str]:
        return lambda kind, split: NOT_APPLICABLE if split.readout is None else render(split)

    def active(kind: str, split: SplitMetrics) -> str:
        if split.active_params is None:
            return NOT_APPLICABLE
        return f"{count(split.active_params.active)} ({percent(split.active_params.active_fraction)})"

    return [
        ("Perplexity per token", lambda kind, split: perplexity(split.ppl_token)),
        ("Perplexity per word", lambda kind, split: perplexity(split.ppl_word)),
        ("Top-1 accuracy", lambda kind, split: percent(split.accuracy)),
        ("Readout perplexity per token", readout(lambda split: perplexity(split.readout.ppl_token))),
        ("Readout perplexity per word", readout(lambda split: perplexity(split.readout.ppl_word))),
        ("Readout top-1 accuracy", readout(lambda split: percent(split.readout.accuracy))),
        ("Exact zeros in states", lambda kind, split: percent(split.sparsity.overall.exact_zero_fraction)),
        (
            f"Near zero, relative (≤ {relative:g} × RMS)",
            lambda kind, split: percent(split.sparsity.overall.near_zero_fraction_relative),
        ),
        (
            f"Near zero, absolute (≤ {absolute:g})",
            lambda kind, split: percent(split.sparsity.overall.near_zero_fraction_absolute),
        ),
        ("Hoyer sparsity", lambda kind, split: f"{split.sparsity.overall.hoyer:.3f}"),
        ("Active parameters per token", active),
        ("Evaluated tokens", lambda kind, split: count(split.n_tokens)),
    ]


def _training_rows(train: dict[str, TrainMetrics]) -> list[tuple[str, Callable[[str, SplitMetrics], str]]]:
    return [
        ("Parameters", lambda kind, split: count(train[kind].parameters)),
        ("Training steps", lambda kind, split: count(train[kind].steps)),
        ("Training tokens", lambda kind, split: count(train[kind].tokens)),
        ("Training time", lambda kind, split: duration(train[kind].timing.train_seconds)),
        ("Training throughput (tokens/s)", lambda kind, split: count(train[kind].timing.tokens_per_s)),
        ("Training loss at the last step, main (log lines average each interval)",
         lambda kind, split: f"{train[kind].final.loss_main:.3f}"),
    ]


def _comparison(inputs: ReportInputs) -> list[str]:
    evaluation = inputs.evaluation
    columns = [(kind, split) for kind in KINDS for split in _SPLITS]
    header = ["Metric"] + [f"{kind.capitalize()} {split}" for kind, split in columns]
    rows = []
    for label, render in _split_rows(evaluation) + _training_rows(inputs.train):
        cells = [render(kind, getattr(getattr(evaluation, kind), split)) for kind, split in columns]
        rows.append([label, *cells])
    return [
        "## Both models on valid and test",
        "",
        "Training rows repeat across splits because each model is trained once.",
        "",
        *_table(header, rows),
    ]


def _sparsity_cells(metrics: Sparsity) -> list[str]:
    return [
        percent(metrics.exact_zero_fraction),
        percent(metrics.near_zero_fraction_relative),
        percent(metrics.near_zero_fraction_absolute),
        f"{metrics.hoyer:.3f}",
        f"{metrics.mean_abs:.4g}",
        f"{metrics.nonzero_per_token:,.1f}",
    ]


def _per_layer(evaluation: EvalMetrics) -> list[str]:
    thresholds = evaluation.thresholds
    header = [
        "Layer",
        "Model",
        "Exact zeros",
        f"Near zero (≤ {thresholds.relative:g} × RMS)",
        f"Near zero (≤ {thresholds.absolute:g})",
        "Hoyer",
        "Mean abs",
        "Nonzeros per token",
    ]
    by_kind = {kind: getattr(evaluation, kind).test.sparsity for kind in KINDS}
    names = sorted({name for sparsity in by_kind.values() for name in sparsity.layers}, key=layer_index)
    rows = []
    for name in names:
        for kind in KINDS:
            layer = by_kind[kind].layers.get(name)
            cells = _sparsity_cells(layer) if layer is not None else [NOT_APPLICABLE] * 6
            rows.append([name.replace("_", " "), kind, *cells])
    rows += [["all layers", kind, *_sparsity_cells(by_kind[kind].overall)] for kind in KINDS]
    return ["## Sparsity per layer (test split)", "", *_table(header, rows, left_columns=2)]


def _figures() -> list[str]:
    return [
        "## Plots",
        "",
        f"![Training losses of both models against the step]({CURVES_PNG})",
        "",
        f"![Exact-zero and near-zero state fractions per layer, test split]({SPARSITY_PNG})",
        "",
        *report_sparsity.figures(),
    ]


def render_report(inputs: ReportInputs) -> str:
    """Return the Markdown text of the report."""
    sections = [
        _header(inputs.evaluation),
        _headlines(inputs.evaluation),
        report_sparsity.zeros_statement(inputs.evaluation),
        _comparison(inputs),
        _per_layer(inputs.evaluation),
        report_sparsity.dead_units_section(inputs.evaluation),
        report_sparsity.site_section(inputs.evaluation),
        report_sparsity.speed_section(inputs.speed),
        report_sparsity.sweep_section(inputs.evaluation),
        _figures(),
    ]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"


def write_report(metrics_dir: Path, plots_dir: Path, out_dir: Path) -> Path:
    """Write out_dir/report.md and its PNG plots, and return the report path.

    Reads train_baseline.json, train_samba.json and evaluate.json from `metrics_dir` and the
    per-step training logs train_baseline.csv and train_samba.csv from `plots_dir`. Raises
    ReportInputError, naming the file and the stage that writes it, before writing anything
    when an input is missing or malformed.
    """
    inputs = load_report_inputs(Path(metrics_dir), Path(plots_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    plot_training_curves(inputs.curves, out_dir / CURVES_PNG)
    plot_sparsity_per_layer(inputs.evaluation, out_dir / SPARSITY_PNG)
    report_sparsity.write_sparsity_plots(inputs.evaluation, out_dir)
    report_path = out_dir / REPORT_NAME
    report_path.write_text(render_report(inputs), encoding="utf-8", newline="\n")
    return report_path
