"""PNG plots for the report: training curves and per-layer sparsity.

Figures are drawn on the Agg canvas without pyplot, so no global backend or figure state
changes, and under matplotlib's default style, so a user's matplotlibrc cannot change them.
Agg writes no timestamp into a PNG, so the same inputs give byte-identical files (checked with
matplotlib 3.11). The "Software" tag is dropped as well, so the bytes do not name the matplotlib
version, although another version may still draw different pixels.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.stages.report_inputs import EvalMetrics, layer_index

COLORS = {"baseline": "tab:blue", "samba": "tab:orange"}
_DPI = 120


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})


def plot_training_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Plot main loss of both models, then Samba's readout and pruning losses, against the step."""
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(13.5, 4.0), layout="constrained")
        main_axes, readout_axes, pruning_axes = figure.subplots(1, 3)

        for kind in ("baseline", "samba"):
            main_axes.plot(curves[kind]["step"], curves[kind]["loss_main"], label=kind, color=COLORS[kind])
        main_axes.set_title("Main next-token loss")
        main_axes.set_ylabel("cross-entropy (nats per token)")
        main_axes.legend()

        samba = curves["samba"]
        readout_axes.plot(samba["step"], samba["loss_readout"], color=COLORS["samba"])
        readout_axes.set_title("Samba readout loss")
        readout_axes.set_ylabel("cross-entropy (nats per token)")

        pruning_axes.plot(samba["step"], samba["loss_pruning"], color=COLORS["samba"])
        pruning_axes.set_title("Samba pruning loss")
        pruning_axes.set_ylabel("mean |h| over all layers' states")

        for axes in (main_axes, readout_axes, pruning_axes):
            axes.set_xlabel("training step")
            axes.grid(alpha=0.3)
        _save(figure, path)


def plot_sparsity_per_layer(evaluation: EvalMetrics, path: Path) -> None:
    """Draw bars per layer of exact-zero and near-zero (relative) state fractions on the test split."""
    layers = {kind: getattr(evaluation, kind).test.sparsity.ordered_layers() for kind in ("baseline", "samba")}
    names = sorted({name for kind_layers in layers.values() for name, _ in kind_layers}, key=layer_index)
    positions = np.arange(len(names))
    width = 0.38
    panels = (
        ("exact_zero_fraction", "Exact zeros"),
        (
            "near_zero_fraction_relative",
            f"Near zero (|h| below {evaluation.thresholds.relative:g} × per-token RMS)",
        ),
    )

    with matplotlib.style.context("default"):
        figure = Figure(figsize=(11.0, 4.0), layout="constrained")
        for axes, (field, title) in zip(figure.subplots(1, 2), panels):
            for offset, kind in ((-width / 2, "baseline"), (width / 2, "samba")):
                by_name = dict(layers[kind])
                # A layer missing from one model gets no bar, not a zero-height bar.
                heights = [100.0 * getattr(by_name[name], field) if name in by_name else np.nan
                           for name in names]
                axes.bar(positions + offset, heights, width, label=kind, color=COLORS[kind])
            axes.set_xticks(positions, [name.replace("_", " ") for name in names])
            axes.set_xlabel("Mamba layer")
            axes.set_ylabel("share of state values (%)")
            axes.set_title(title)
            axes.grid(axis="y", alpha=0.3)
            axes.legend()
        _save(figure, path)
