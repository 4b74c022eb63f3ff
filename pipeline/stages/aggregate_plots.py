"""PNG plots of the aggregate experiments report: the Pareto plot and the α × λ heat maps.

Drawn like the per-run report's plots: on the Agg canvas without pyplot, under matplotlib's
default style, with no "Software" tag, so the same experiments give byte-identical files.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.stages.aggregate import (
    ALPHA,
    LAMBDA,
    ExperimentResult,
    Split,
    group_label,
    pareto_front,
    sparsity_of,
    sweep_keys,
    varying_keys,
)

_DPI = 120


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})


def _groups(results: list[ExperimentResult]) -> dict[str, list[ExperimentResult]]:
    """Split results by every param other than α and λ that differs between them."""
    keys = [*sweep_keys(results), *varying_keys(results)]
    groups: dict[str, list[ExperimentResult]] = defaultdict(list)
    for result in results:
        groups[group_label(result, keys)].append(result)
    return dict(groups)


def plot_pareto(results: list[ExperimentResult], split: Split, path: Path) -> None:
    """Plot Samba's perplexity against its state sparsity per run, with the Pareto frontier marked."""
    points = [(100.0 * sparsity_of(r.split("samba", split)), r.split("samba", split).ppl_token) for r in results]
    front = pareto_front(points)
    baselines = sorted({(100.0 * sparsity_of(r.split("baseline", split)), r.split("baseline", split).ppl_token)
                        for r in results})

    with matplotlib.style.context("default"):
        figure = Figure(figsize=(8.0, 5.5), layout="constrained")
        axes = figure.subplots()
        for label, members in _groups(results).items():
            xs = [points[results.index(member)][0] for member in members]
            ys = [points[results.index(member)][1] for member in members]
            axes.scatter(xs, ys, s=36, label=f"Samba, {label}", zorder=3)
        frontier = sorted(point for point, on_front in zip(points, front) if on_front)
        axes.plot([x for x, _ in frontier], [y for _, y in frontier], color="black", linewidth=1.2,
                  marker="o", markersize=11, markerfacecolor="none", label="Pareto frontier", zorder=4)
        axes.scatter([x for x, _ in baselines], [y for _, y in baselines], marker="x", s=60, color="black",
                     label="dense baseline", zorder=3)
        for result, (x, y) in zip(results, points):
            axes.annotate(result.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ppl_values = [y for _, y in points] + [y for _, y in baselines]
        if max(ppl_values) / min(ppl_values) > 3.0:
            axes.set_yscale("log")
        axes.set_xlabel("near-zero state values, relative to per-token RMS (%)")
        axes.set_ylabel(f"perplexity per token ({split} split)")
        axes.set_title("Samba: perplexity against state sparsity (lower right is better)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        _save(figure, path)


def _grid(members: list[ExperimentResult], alphas: list[float], lambdas: list[float], value) -> np.ndarray:
    """Average `value` over the members at each (α, λ) cell; NaN where no run exists."""
    sums = np.zeros((len(alphas), len(lambdas)))
    counts = np.zeros((len(alphas), len(lambdas)))
    for member in members:
        row = alphas.index(float(member.params[ALPHA]))
        column = lambdas.index(float(member.params[LAMBDA]))
        sums[row, column] += value(member)
        counts[row, column] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _heatmap(axes, grid: np.ndarray, alphas: list[float], lambdas: list[float], title: str, colormap: str,
             fmt: str) -> None:
    image = axes.imshow(grid, cmap=colormap, aspect="auto", origin="lower")
    axes.figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(lambdas)), [f"{value:g}" for value in lambdas])
    axes.set_yticks(range(len(alphas)), [f"{value:g}" for value in alphas])
    axes.set_xlabel(f"λ ({LAMBDA})")
    axes.set_ylabel(f"α ({ALPHA})")
    axes.set_title(title, fontsize=9)
    for (row, column), value in np.ndenumerate(grid):
        if not math.isnan(value):
            axes.text(column, row, format(value, fmt), ha="center", va="center", fontsize=8, color="white",
                      bbox={"facecolor": "black", "alpha": 0.35, "linewidth": 0})


def plot_heatmaps(results: list[ExperimentResult], split: Split, path: Path) -> None:
    """Draw α × λ heat maps of Samba's perplexity and sparsity, one row per group of other params.

    Runs that share α, λ and group are averaged; cells without a run stay blank.
    """
    usable = [r for r in results if r.params.get(ALPHA) is not None and r.params.get(LAMBDA) is not None]
    groups = _groups(usable)
    alphas = sorted({float(r.params[ALPHA]) for r in usable})
    lambdas = sorted({float(r.params[LAMBDA]) for r in usable})

    with matplotlib.style.context("default"):
        figure = Figure(figsize=(11.0, 0.6 + 3.6 * max(len(groups), 1)), layout="constrained")
        panels = np.atleast_2d(figure.subplots(max(len(groups), 1), 2, squeeze=False))
        for (label, members), (ppl_axes, sparsity_axes) in zip(groups.items(), panels):
            ppl = _grid(members, alphas, lambdas, lambda r: r.split("samba", split).ppl_token)
            sparsity = _grid(members, alphas, lambdas, lambda r: 100.0 * sparsity_of(r.split("samba", split)))
            # Reversed colormap for perplexity, so in both panels a brighter cell is better.
            _heatmap(ppl_axes, ppl, alphas, lambdas, f"Samba perplexity ({split}); {label}", "viridis_r", ".1f")
            _heatmap(sparsity_axes, sparsity, alphas, lambdas, f"near-zero states (%), {split}; {label}",
                     "viridis", ".2f")
        _save(figure, path)
