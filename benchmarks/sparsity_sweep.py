"""Collect several evaluate.json files of a sparsity sweep into one table and one perplexity-vs-sparsity chart.

Run: python benchmarks/sparsity_sweep.py NAME=path/to/evaluate.json ... --out docs/sweep.png
Every row is measured on the test split with the zeros of its method applied. The dense
baseline's perplexity comes from the first file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def rows_of(name: str, evaluation: dict) -> list[dict]:
    """Return the run's model as evaluated, then its post-hoc sweep points, as flat rows."""
    samba = evaluation["samba"]
    test = samba["test"]
    layers = test["sparsity"]["layers"].values()
    rows = [{"run": name, "method": samba["sparsity_method"]["label"] + " (as trained)",
             "zeros": test["sparsity"]["overall"]["exact_zero_fraction"],
             "min_layer": min(layer["exact_zero_fraction"] for layer in layers),
             "ppl": test["ppl_token"], "readout_ppl": test["readout"]["ppl_token"]}]
    for point in samba["sweep"]:
        rows.append({"run": name, "method": f"+ {point['method']} {100 * point['target']:g}% post hoc",
                     "zeros": point["exact_zero_fraction"], "min_layer": point["min_layer_exact_zero_fraction"],
                     "ppl": point["ppl_token"], "readout_ppl": point["readout_ppl_token"]})
    return rows


def markdown(rows: list[dict], baseline_ppl: float) -> str:
    lines = [f"Dense baseline test perplexity: {baseline_ppl:.1f}", "",
             "| Run | Method | Exact zeros | Lowest layer | Perplexity | × baseline | Readout perplexity | Readout / main |",
             "|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['method']} | {100 * row['zeros']:.1f}% | {100 * row['min_layer']:.1f}% | "
                     f"{row['ppl']:.1f} | {row['ppl'] / baseline_ppl:.3f} | {row['readout_ppl']:.1f} | "
                     f"{row['readout_ppl'] / row['ppl']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], baseline_ppl: float, path: Path) -> None:
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(8.0, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        for run in dict.fromkeys(row["run"] for row in rows):
            for post_hoc in ("magnitude", "topk"):
                points = [row for row in rows if row["run"] == run and post_hoc in row["method"]]
                if points:
                    axes.plot([100 * p["zeros"] for p in points], [p["ppl"] for p in points], marker="o",
                              linestyle="-" if post_hoc == "magnitude" else "--", label=f"{run} + {post_hoc}")
            trained = next(row for row in rows if row["run"] == run and "as trained" in row["method"])
            axes.plot([100 * trained["zeros"]], [trained["ppl"]], marker="*", markersize=14, linestyle="none",
                      label=f"{run} as trained")
        axes.axhline(baseline_ppl, color="black", linewidth=0.8, label="dense baseline")
        axes.axhline(1.05 * baseline_ppl, color="black", linewidth=0.8, linestyle=":", label="1.05 × baseline")
        axes.set_xlabel("exact zeros at the sparsity site, test split (%)")
        axes.set_ylabel("main perplexity per token, zeros applied")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.savefig(path, format="png", dpi=120, metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=path/to/evaluate.json")
    parser.add_argument("--out", type=Path, required=True, help="PNG chart to write")
    args = parser.parse_args()
    rows, baseline_ppl = [], None
    for run in args.runs:
        name, path = run.split("=", 1)
        evaluation = json.loads(Path(path).read_text(encoding="utf-8"))
        baseline_ppl = baseline_ppl or evaluation["baseline"]["test"]["ppl_token"]
        rows += rows_of(name, evaluation)
    plot(rows, baseline_ppl, args.out)
    print(markdown(rows, baseline_ppl))


if __name__ == "__main__":
    main()
