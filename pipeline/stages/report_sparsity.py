"""Report sections and plots about sparsity: which zeros are applied, the method sweep, sites and patterns.

Every number here comes from evaluate.json, where perplexity and accuracy were measured
with the enforced zeros applied. The plots follow report_plots.py: the Agg canvas, the
default style and no Software tag, so the same inputs give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.style
import numpy as np
from matplotlib.figure import Figure

from pipeline.stages.report_inputs import KINDS, EvalMetrics, ModelEval, SiteSpeed
from pipeline.stages.report_plots import COLORS, _save

TRADEOFF_PNG = "perplexity_vs_sparsity.png"
HISTOGRAM_PNG = "abs_over_rms_histogram.png"
FIRING_PNG = "channel_firing_rates.png"

_SITE_NAMES = {"ssm_state": "SSM states h_t", "block_output": "block outputs", "inner": "gated inner outputs"}
_MARKERS = {"magnitude": "o", "topk": "s"}


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def zeros_statement(evaluation: EvalMetrics) -> list[str]:
    """Say which numbers have enforced zeros applied, and that near zeros are not sparsity."""
    method = evaluation.samba.sparsity_method
    if method is None:
        return []
    site = _SITE_NAMES[method.site]
    if method.zeros_applied:
        applied = (f"Samba's numbers in this report are measured with the zeros of **{method.label}** applied to "
                   f"its {site}: every perplexity and accuracy is computed from the zeroed tensors.")
    else:
        applied = (f"Samba ({method.label} penalty on its {site}) enforces no zeros, so its numbers are those of "
                   "the model as trained, and only values that are exactly 0 count as zeros.")
    return [
        "## Which numbers have zeros applied",
        "",
        applied,
        "The baseline runs dense. Near-zero shares (relative to the per-token RMS, or below the absolute "
        "threshold) describe the shape of the values, but a matmul skips only exact zeros, so only exact zeros "
        "count as sparsity and feed the active-parameter figures.",
        "The post-hoc sweep below zeroes each model's values with topk or magnitude at each target and "
        "re-measures the test split with those zeros applied.",
    ]


def _sweep_rows(kind: str, model: ModelEval) -> list[list[str]]:
    rows = []
    for point in model.sweep:
        readout = f"{point.readout_ppl_token:.1f}" if point.readout_ppl_token is not None else "–"
        rows.append([kind, point.method, _percent(point.target), _percent(point.exact_zero_fraction),
                     _percent(point.min_layer_exact_zero_fraction), f"{point.ppl_token:.1f}", readout])
    return rows


def sweep_section(evaluation: EvalMetrics) -> list[str]:
    rows = [row for kind in KINDS for row in _sweep_rows(kind, getattr(evaluation, kind))]
    if not rows:
        return []
    header = ["Model", "Post-hoc method", "Target", "Exact zeros", "Lowest layer", "Perplexity", "Readout perplexity"]
    return ["## Post-hoc sweep (test split, zeros applied)", "",
            "magnitude zeroes |v| at or below a per-layer threshold calibrated on validation data; topk keeps "
            "the largest (1 - target) share of |v| per token and layer.", "", *_table(header, rows)]


def site_section(evaluation: EvalMetrics) -> list[str]:
    """Per matmul that reads the site: the share of its weight columns a token uses, from measured zeros."""
    rows = []
    for kind in KINDS:
        active = getattr(evaluation, kind).test.site_active_params
        for matmul in active.matmuls if active is not None else []:
            shape = " × ".join(str(size) for size in matmul.weight_shape)
            note = "" if matmul.counted else " (tied with the embedding, not subtracted)"
            rows.append([kind, matmul.name + note, shape, _percent(matmul.active_column_fraction)])
    if not rows:
        return []
    return ["## Active weight columns of the matmuls the site feeds (test split)", "",
            *_table(["Model", "Matmul", "Weight (out × in)", "Active columns"], rows)]


def dead_units_section(evaluation: EvalMetrics) -> list[str]:
    rows = []
    for kind in KINDS:
        for name, layer in getattr(evaluation, kind).test.sparsity.ordered_layers():
            if layer.dead_fraction is not None:
                rows.append([kind, name.replace("_", " "), _percent(layer.exact_zero_fraction),
                             _percent(layer.dead_fraction)])
    if not rows:
        return []
    return ["## Dead units per layer (test split)", "",
            "A dead unit is a value position that is never nonzero on the whole split; only whole dead units "
            "could be removed from training as well.", "",
            *_table(["Model", "Layer", "Exact zeros", "Dead units"], rows)]


def figures() -> list[str]:
    return [
        f"![Perplexity against exact zeros for every method, test split]({TRADEOFF_PNG})",
        "",
        f"![Histogram of |v| / per-token RMS on a log scale, test split]({HISTOGRAM_PNG})",
        "",
        f"![Firing rate of every channel per layer, test split]({FIRING_PNG})",
    ]


def _label_axes(axes, xlabel: str, ylabel: str, legend_size: int) -> None:
    """Label both axes, draw a light grid, and add a legend when anything has a label."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=legend_size)


def plot_tradeoff(evaluation: EvalMetrics, path: Path) -> None:
    """Plot main and readout perplexity against exact zeros: sweep curves and each model as evaluated."""
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(11.0, 4.2), layout="constrained")
        main_axes, readout_axes = figure.subplots(1, 2)
        for kind in KINDS:
            model = getattr(evaluation, kind)
            for method in ("magnitude", "topk"):
                points = [point for point in model.sweep if point.method == method]
                if not points:
                    continue
                zeros = [100.0 * point.exact_zero_fraction for point in points]
                main_axes.plot(zeros, [point.ppl_token for point in points], marker=_MARKERS[method],
                               color=COLORS[kind], linestyle="-" if method == "magnitude" else "--",
                               label=f"{kind} + {method} (post hoc)")
                readout = [point.readout_ppl_token for point in points]
                if all(value is not None for value in readout):
                    readout_axes.plot(zeros, readout, marker=_MARKERS[method], color=COLORS[kind],
                                      linestyle="-" if method == "magnitude" else "--", label=f"{kind} + {method}")
            label = kind if model.sparsity_method is None or kind == "baseline" else model.sparsity_method.label
            zeros = 100.0 * model.test.sparsity.overall.exact_zero_fraction
            main_axes.plot([zeros], [model.test.ppl_token], marker="*", markersize=14, linestyle="none",
                           color=COLORS[kind], label=f"{label} (as evaluated)")
            if model.test.readout is not None:
                readout_axes.plot([zeros], [model.test.readout.ppl_token], marker="*", markersize=14,
                                  linestyle="none", color=COLORS[kind], label=f"{label} (as evaluated)")
        for axes, title in ((main_axes, "Main output"), (readout_axes, "Readout")):
            axes.set_title(title)
            _label_axes(axes, "exact zeros at the sparsity site (%)", "perplexity per token, zeros applied", 7)
        _save(figure, path)


def plot_histogram(evaluation: EvalMetrics, path: Path) -> None:
    """Plot the share of nonzero values per bin of log10(|v| / per-token RMS), exact zeros in the legend."""
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(7.0, 4.0), layout="constrained")
        axes = figure.subplots()
        for kind in KINDS:
            histogram = getattr(evaluation, kind).test.sparsity.overall.abs_over_rms_histogram
            if histogram is None:
                continue
            total = sum(histogram.counts) + histogram.exact_zeros
            edges = 10.0 ** np.asarray(histogram.log10_edges)
            shares = np.asarray(histogram.counts, dtype=float) / max(total, 1)
            axes.stairs(shares, edges, color=COLORS[kind],
                        label=f"{kind} (exact zeros: {_percent(histogram.exact_zeros / max(total, 1))}, not drawn)")
        axes.set_xscale("log")
        axes.set_yscale("log")
        _label_axes(axes, "|v| / RMS of its token vector", "share of values", 8)
        _save(figure, path)


def plot_firing_rates(evaluation: EvalMetrics, path: Path) -> None:
    """Draw one heat map per model: layers as rows, channels as columns, colour = share of nonzero values."""
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(11.0, 3.6), layout="constrained")
        for axes, kind in zip(figure.subplots(1, 2), KINDS):
            layers = getattr(evaluation, kind).test.sparsity.ordered_layers()
            rates = [layer.channel_firing_rate for _, layer in layers if layer.channel_firing_rate is not None]
            axes.set_title(f"{kind}: channel firing rate")
            if not rates:
                axes.set_axis_off()
                continue
            image = axes.imshow(np.asarray(rates), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis",
                                interpolation="nearest")
            axes.set_xlabel("channel")
            axes.set_ylabel("layer")
            axes.set_yticks(range(len(rates)))
            figure.colorbar(image, ax=axes, label="share of values nonzero")
        _save(figure, path)


def write_sparsity_plots(evaluation: EvalMetrics, out_dir: Path) -> None:
    plot_tradeoff(evaluation, out_dir / TRADEOFF_PNG)
    plot_histogram(evaluation, out_dir / HISTOGRAM_PNG)
    plot_firing_rates(evaluation, out_dir / FIRING_PNG)


def speed_section(speed: SiteSpeed | None) -> list[str]:
    """Write the measured dense and sparse times of the matmuls that read Samba's site."""
    if speed is None:
        return []
    lines = ["## Measured speed of the matmuls that read the site (batch 1, this machine)", ""]
    if not speed.measured:
        return [*lines, f"Not measured: {speed.reason}."]
    header = ["Matmul", "Weight (out × in)", "Nonzero inputs", "Dense (µs/token)", "Sparse (µs/token)", "Speedup"]
    rows = [[matmul.name, " × ".join(str(size) for size in matmul.weight_shape),
             f"{100 * matmul.nonzero_share:.1f}%", f"{matmul.dense_us_per_token:.0f}",
             f"{matmul.sparse_us_per_token:.0f}", f"{matmul.dense_us_per_token / matmul.sparse_us_per_token:.2f}×"]
            for matmul in speed.matmuls]
    return [*lines,
            f"Each matmul multiplies the {speed.site} vectors of the first test tokens one at a time, with the "
            f"zeros of {speed.label} applied: once dense, once through the sparse-input path that reads only "
            f"the weight rows of nonzero inputs ({speed.threads} CPU threads). These are wall-clock times of "
            "one run, so they vary between runs and machines; docs/benchmarks-sparsity.md has end-to-end decode.",
            "", *_table(header, rows)]

