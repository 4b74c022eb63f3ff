"""Tests for the report stage: headline numbers, tables, plots, determinism and input errors."""

from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path

import pytest

from pipeline.stages.report import ReportInputError, duration, render_report, write_report
from pipeline.stages.report_inputs import load_report_inputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_LAYERS = 3


def _sparsity(
    exact: float, relative: float, absolute: float, hoyer: float, mean_abs: float, nonzeros: float
) -> dict:
    return {
        "exact_zero_fraction": exact,
        "near_zero_fraction_relative": relative,
        "near_zero_fraction_absolute": absolute,
        "hoyer": hoyer,
        "mean_abs": mean_abs,
        "nonzero_per_token": nonzeros,
    }


def _split(ppl_token: float, ppl_word: float, accuracy: float, sparse: bool, shift: float) -> dict:
    if sparse:
        layers = {
            f"layer_{i}": _sparsity(
                0.40 + 0.1 * i + shift, 0.70 + 0.05 * i + shift, 0.55 + 0.05 * i, 0.61, 0.021, 900.0
            )
            for i in range(N_LAYERS)
        }
        overall = _sparsity(0.5123 + shift, 0.7891 + shift, 0.6012, 0.6345, 0.0187, 754.3)
    else:
        layers = {
            f"layer_{i}": _sparsity(0.0, 0.02 + 0.01 * i, 0.004, 0.22, 0.31, 2048.0) for i in range(N_LAYERS)
        }
        overall = _sparsity(0.0, 0.0311, 0.0042, 0.2234, 0.3071, 2048.0)
    return {
        "n_tokens": 82430,
        "n_words": 82430,
        "nll_per_token": 4.8,
        "ppl_token": ppl_token,
        "ppl_word": ppl_word,
        "accuracy": accuracy,
        "sparsity": {"overall": overall, "layers": layers},
    }


def _samba_split(ppl_token: float, shift: float) -> dict:
    split = _split(ppl_token, ppl_token + 0.5, 0.2011 + shift, sparse=True, shift=shift)
    split["readout"] = {"nll_per_token": 5.1, "ppl_token": 171.24, "ppl_word": 171.24, "accuracy": 0.1843}
    split["active_params"] = {
        "total": 4_123_456,
        "active": 2_834_123.7,
        "active_fraction": 0.6873,
        "reduction": 0.3127,
        "readout_input_active_fraction": 0.2109,
    }
    return split


def make_evaluation(source: str = "local") -> dict:
    return {
        "corpus": {
            "source": source,
            "description": "Penn Treebank (local folder data/ptb)",
            "tokenizer": "word",
            "vocab_size": 10000,
        },
        "thresholds": {"relative": 0.01, "absolute": 0.001},
        "baseline": {
            "parameters": 3_456_789,
            "valid": _split(125.46, 125.46, 0.2212, sparse=False, shift=0.0),
            "test": _split(120.0, 120.0, 0.2254, sparse=False, shift=0.0),
        },
        "samba": {
            "parameters": 4_123_456,
            "valid": _samba_split(155.55, shift=-0.01),
            "test": _samba_split(150.0, shift=0.0),
        },
    }


def make_train(kind: str) -> dict:
    final = {"loss_total": 5.0123, "loss_main": 4.8765}
    if kind == "samba":
        final |= {"loss_readout": 5.2011, "loss_pruning": 0.0213}
    return {
        "kind": kind,
        "steps": 2000,
        "tokens": 16_384_000,
        "parameters": 3_456_789 if kind == "baseline" else 4_123_456,
        "final": final,
    }


def make_timing(kind: str) -> dict:
    return {
        "train_seconds": 1234.5 if kind == "baseline" else 1543.2,
        "tokens_per_s": 13271.8 if kind == "baseline" else 10616.9,
    }


def make_curve(kind: str) -> str:
    """Return a per-step training log with ten rows and falling losses."""
    rows = []
    for i, step in enumerate(range(0, 1000, 100)):
        lr = f"{0.001 * (i + 1) / 10:.6f}"
        main = f"{9.2 - 0.4 * i:.4f}"
        if kind == "baseline":
            rows.append(f"{step},{main},{main},{lr},13000.5")
        else:
            total, readout, pruning = f"{14.0 - 0.5 * i:.4f}", f"{9.4 - 0.4 * i:.4f}", f"{0.3 / (i + 1):.4f}"
            rows.append(f"{step},{total},{main},{readout},{pruning},{lr},10500.25")
    if kind == "baseline":
        header = "step,loss_total,loss_main,lr,tokens_per_s"
    else:
        header = "step,loss_total,loss_main,loss_readout,loss_pruning,lr,tokens_per_s"
    return "\n".join([header, *rows]) + "\n"


def write_inputs(root: Path, source: str = "local") -> tuple[Path, Path]:
    metrics_dir, plots_dir = root / "metrics", root / "plots"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    (metrics_dir / "evaluate.json").write_text(json.dumps(make_evaluation(source), indent=2))
    for kind in ("baseline", "samba"):
        (metrics_dir / f"train_{kind}.json").write_text(json.dumps(make_train(kind), indent=2))
        (metrics_dir / f"timing_{kind}.json").write_text(json.dumps(make_timing(kind), indent=2))
        (plots_dir / f"train_{kind}.csv").write_text(make_curve(kind))
    return metrics_dir, plots_dir


@pytest.fixture
def report(tmp_path: Path) -> tuple[Path, str]:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    path = write_report(metrics_dir, plots_dir, tmp_path / "reports")
    return path, path.read_text(encoding="utf-8")


def pct(fraction: float, decimals: int) -> str:
    return f"{100 * fraction:.{decimals}f}%"


def test_write_report_returns_report_path(tmp_path: Path) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    out_dir = tmp_path / "nested" / "reports"

    path = write_report(metrics_dir, plots_dir, out_dir)

    assert path == out_dir / "report.md"
    assert path.is_file()


def test_headline_counts_exact_zeros(report: tuple[Path, str]) -> None:
    _, text = report
    overall = make_evaluation()["samba"]["test"]["sparsity"]["overall"]
    baseline = make_evaluation()["baseline"]["test"]["sparsity"]["overall"]

    assert f"**{pct(overall['exact_zero_fraction'], 1)} of Samba's sparsity-site values are exactly zero**" in text
    assert f"{pct(overall['near_zero_fraction_relative'], 1)} have |h| ≤ 0.01 × the per-token RMS" in text
    assert "the small values that are not exactly 0 are shrinkage, not sparsity" in text
    assert f"The dense baseline has {pct(baseline['exact_zero_fraction'], 1)} exactly zero" in text


def test_headline_relative_performance(report: tuple[Path, str]) -> None:
    _, text = report
    evaluation = make_evaluation()
    ratio = evaluation["baseline"]["test"]["ppl_token"] / evaluation["samba"]["test"]["ppl_token"]

    # Closed form: baseline perplexity 120 over Samba perplexity 150 is 80%.
    assert pct(ratio, 1) == "80.0%"
    assert "**Samba reaches 80.0% of the baseline's performance**" in text
    assert "(120.0 / 150.0)" in text


def test_headline_active_parameter_reduction(report: tuple[Path, str]) -> None:
    _, text = report
    active = make_evaluation()["samba"]["test"]["active_params"]

    assert f"**{pct(active['reduction'], 1)} reduction in active parameters.**" in text
    assert "on average 2,834,124 of its 4,123,456 parameters per token" in text
    assert "the readout skips the input weight columns of state entries that are zero" in text
    assert f"({pct(active['readout_input_active_fraction'], 1)} of those columns stay active)" in text


def test_comparison_table_rows(report: tuple[Path, str]) -> None:
    _, text = report
    evaluation = make_evaluation()
    columns = [evaluation[kind][split] for kind in ("baseline", "samba") for split in ("valid", "test")]

    def row(label: str, cells: list[str]) -> str:
        return "| " + " | ".join([label, *cells]) + " |"

    assert "| Metric | Baseline valid | Baseline test | Samba valid | Samba test |" in text
    assert row("Perplexity per token", [f"{c['ppl_token']:.1f}" for c in columns]) in text
    assert row("Perplexity per word", [f"{c['ppl_word']:.1f}" for c in columns]) in text
    assert row("Top-1 accuracy", [pct(c["accuracy"], 2) for c in columns]) in text
    assert row("Readout perplexity per token", ["–", "–", "171.2", "171.2"]) in text
    assert row("Readout top-1 accuracy", ["–", "–", "18.43%", "18.43%"]) in text
    exact = [pct(c["sparsity"]["overall"]["exact_zero_fraction"], 2) for c in columns]
    assert row("Exact zeros in states", exact) in text
    relative = [pct(c["sparsity"]["overall"]["near_zero_fraction_relative"], 2) for c in columns]
    assert row("Near zero, relative (≤ 0.01 × RMS)", relative) in text
    absolute = [pct(c["sparsity"]["overall"]["near_zero_fraction_absolute"], 2) for c in columns]
    assert row("Near zero, absolute (≤ 0.001)", absolute) in text
    assert row("Hoyer sparsity", [f"{c['sparsity']['overall']['hoyer']:.3f}" for c in columns]) in text
    assert row("Active parameters per token", ["–", "–", "2,834,124 (68.73%)", "2,834,124 (68.73%)"]) in text
    assert row("Parameters", ["3,456,789", "3,456,789", "4,123,456", "4,123,456"]) in text
    assert row("Training time", ["20.6 min", "20.6 min", "25.7 min", "25.7 min"]) in text
    assert row("Training throughput (tokens/s)", ["13,272", "13,272", "10,617", "10,617"]) in text


def test_per_layer_table_rows(report: tuple[Path, str]) -> None:
    _, text = report
    evaluation = make_evaluation()

    for kind in ("baseline", "samba"):
        sparsity = evaluation[kind]["test"]["sparsity"]
        for index in range(N_LAYERS):
            layer = sparsity["layers"][f"layer_{index}"]
            expected = (
                f"| layer {index} | {kind} | {pct(layer['exact_zero_fraction'], 2)} "
                f"| {pct(layer['near_zero_fraction_relative'], 2)} | {pct(layer['near_zero_fraction_absolute'], 2)} "
                f"| {layer['hoyer']:.3f} |"
            )
            assert expected in text
        overall = sparsity["overall"]
        assert f"| all layers | {kind} | {pct(overall['exact_zero_fraction'], 2)} |" in text


def test_layers_sorted_by_index(tmp_path: Path) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    evaluation = make_evaluation()
    for kind in ("baseline", "samba"):
        layers = evaluation[kind]["test"]["sparsity"]["layers"]
        for index in range(N_LAYERS, 11):
            layers[f"layer_{index}"] = copy.deepcopy(layers["layer_0"])
    (metrics_dir / "evaluate.json").write_text(json.dumps(evaluation))

    text = render_report(load_report_inputs(metrics_dir, plots_dir))

    assert text.index("| layer 9 | samba |") < text.index("| layer 10 | baseline |")
    assert text.index("| layer 2 | samba |") < text.index("| layer 3 | baseline |")


@pytest.mark.parametrize("source", ["hub", "local", "synthetic"])
def test_synthetic_warning_only_for_synthetic(tmp_path: Path, source: str) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path, source=source)

    text = render_report(load_report_inputs(metrics_dir, plots_dir))

    assert f", source `{source}`, word-level tokenizer, vocabulary of 10,000 tokens." in text
    assert ("generated smoke-test corpus" in text) == (source == "synthetic")
    assert ("not comparable with published results" in text) == (source == "synthetic")


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == PNG_SIGNATURE
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


@pytest.mark.parametrize("name", ["training_curves.png", "sparsity_per_layer.png"])
def test_plot_is_valid_png(report: tuple[Path, str], name: str) -> None:
    path, text = report
    chunks = _png_chunks((path.parent / name).read_bytes())
    kinds = [kind for kind, _ in chunks]
    width, height = struct.unpack(">II", chunks[0][1][:8])

    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert width > 400
    assert height > 300
    assert not any(kind == b"tEXt" and body.startswith(b"Software") for kind, body in chunks)
    assert f"]({name})" in text


def test_rerun_is_byte_identical(tmp_path: Path) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    first = write_report(metrics_dir, plots_dir, tmp_path / "first").parent
    second = write_report(metrics_dir, plots_dir, tmp_path / "second").parent

    for name in ("report.md", "training_curves.png", "sparsity_per_layer.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


MISSING_CASES = [
    ("metrics", "train_baseline.json", "`dvc repro train_baseline`"),
    ("metrics", "train_samba.json", "`dvc repro train_samba`"),
    ("metrics", "timing_samba.json", "`dvc repro train_samba`"),
    ("metrics", "evaluate.json", "`dvc repro evaluate` (or `samba evaluate`)"),
    ("plots", "train_baseline.csv", "`dvc repro train_baseline`"),
    ("plots", "train_samba.csv", "`dvc repro train_samba`"),
]


@pytest.mark.parametrize(("folder", "name", "command"), MISSING_CASES)
def test_missing_input_raises(tmp_path: Path, folder: str, name: str, command: str) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    (tmp_path / folder / name).unlink()

    with pytest.raises(ReportInputError) as caught:
        write_report(metrics_dir, plots_dir, tmp_path / "reports")

    message = str(caught.value)
    assert message.startswith(f"{tmp_path / folder / name} not found.")
    assert command in message
    assert "\n" not in message
    assert not (tmp_path / "reports").exists()


DELETE = object()


def _set(document: dict, dotted: str, value: object) -> None:
    """Set the value at a dotted key, or delete the key when value is DELETE."""
    *parents, last = dotted.split(".")
    for key in parents:
        document = document[key]
    if value is DELETE:
        del document[last]
    else:
        document[last] = value


JSON_CASES = [
    ("evaluate.json", "baseline.test.ppl_token", DELETE, "`baseline.test.ppl_token`"),
    ("evaluate.json", "samba.valid.accuracy", "high", "`samba.valid.accuracy`"),
    ("evaluate.json", "samba.test.sparsity.overall.exact_zero_fraction", 1.5, "exact_zero_fraction"),
    ("evaluate.json", "corpus.source", "web", "`corpus.source`"),
    ("evaluate.json", "samba.test.readout", DELETE, "`samba.test.readout`"),
    ("evaluate.json", "samba.valid.active_params", DELETE, "`samba.valid.active_params`"),
    ("evaluate.json", "baseline.test.sparsity.layers.block_0", _sparsity(0, 0, 0, 0, 0, 0), "expected layer_<index>"),
    ("evaluate.json", "thresholds", DELETE, "`thresholds`"),
    ("train_baseline.json", "kind", "samba", "expected 'baseline'"),
    ("train_samba.json", "final.loss_pruning", DELETE, "loss_pruning"),
    ("timing_samba.json", "tokens_per_s", None, "`tokens_per_s`"),
]


@pytest.mark.parametrize(("name", "key", "value", "fragment"), JSON_CASES)
def test_malformed_json_raises(tmp_path: Path, name: str, key: str, value: object, fragment: str) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    path = metrics_dir / name
    document = json.loads(path.read_text())
    _set(document, key, value)
    path.write_text(json.dumps(document))

    with pytest.raises(ReportInputError) as caught:
        write_report(metrics_dir, plots_dir, tmp_path / "reports")

    message = str(caught.value)
    assert message.startswith(f"{path} is invalid")
    assert fragment in message
    assert "Rerun `dvc repro" in message
    assert "\n" not in message


def test_truncated_json_raises(tmp_path: Path) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    path = metrics_dir / "evaluate.json"
    path.write_text(path.read_text()[:200])

    with pytest.raises(ReportInputError, match="is not valid JSON") as caught:
        write_report(metrics_dir, plots_dir, tmp_path / "reports")

    assert str(caught.value).startswith(str(path))
    assert "\n" not in str(caught.value)


CSV_CASES = [
    ("train_samba.csv", lambda text: text.replace("loss_pruning,", "", 1), "missing the column(s) loss_pruning"),
    ("train_baseline.csv", lambda text: text.splitlines()[0] + "\n", "contains no logged steps"),
    (
        "train_baseline.csv",
        lambda text: text.replace("13000.5", "fast", 1),
        "non-numeric tokens_per_s ('fast') on line 2",
    ),
    ("train_samba.csv", lambda text: text + "1000,1.0\n", "has no loss_main value on line 12"),
]


@pytest.mark.parametrize(("name", "corrupt", "fragment"), CSV_CASES)
def test_malformed_curve_raises(tmp_path: Path, name: str, corrupt, fragment: str) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    path = plots_dir / name
    path.write_text(corrupt(path.read_text()))

    with pytest.raises(ReportInputError) as caught:
        write_report(metrics_dir, plots_dir, tmp_path / "reports")

    message = str(caught.value)
    assert message.startswith(str(path))
    assert fragment in message
    assert f"`dvc repro {name.removesuffix('.csv')}`" in message


@pytest.mark.parametrize(("seconds", "expected"), [(59.04, "59.0 s"), (900.0, "15.0 min"), (9000.0, "2.50 h")])
def test_duration_units(seconds: float, expected: str) -> None:
    assert duration(seconds) == expected


def add_sparsity_methods(evaluation: dict) -> dict:
    """Add what the evaluate stage writes about enforced zeros: the method and a two-point sweep."""
    evaluation["samba"]["sparsity_method"] = {"label": "topk 90% (l1_rms penalty)", "penalty": "l1_rms",
                                              "method": "topk", "site": "inner", "target": 0.9,
                                              "zeros_applied": True}
    evaluation["baseline"]["sparsity_method"] = {"label": "l1", "penalty": "l1", "method": "none",
                                                 "site": "inner", "target": None, "zeros_applied": False}
    for kind, ppl in (("baseline", 130.0), ("samba", 155.0)):
        evaluation[kind]["sweep"] = [
            {"method": method, "target": 0.9, "ppl_token": ppl, "accuracy": 0.2, "exact_zero_fraction": 0.9012,
             "min_layer_exact_zero_fraction": 0.8876, "readout_ppl_token": 170.0 if kind == "samba" else None}
            for method in ("magnitude", "topk")
        ]
        evaluation[kind]["test"]["site_active_params"] = {
            "total": 4_000_000, "active": 3_000_000.0, "reduction": 0.25,
            "matmuls": [{"name": "layer_0.out_proj", "weight_shape": [128, 256], "active_column_fraction": 0.1}],
        }
    return evaluation


def test_report_states_applied_zeros_and_sweep(tmp_path: Path) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    (metrics_dir / "evaluate.json").write_text(json.dumps(add_sparsity_methods(make_evaluation())))
    path = write_report(metrics_dir, plots_dir, tmp_path / "reports")
    text = path.read_text(encoding="utf-8")

    assert "measured with the zeros of **topk 90% (l1_rms penalty)** applied to its gated inner outputs" in text
    assert "| samba | topk | 90.0% | 90.1% | 88.8% | 155.0 | 170.0 |" in text
    assert "| baseline | magnitude | 90.0% | 90.1% | 88.8% | 130.0 | – |" in text
    assert "| samba | layer_0.out_proj | 128 × 256 | 10.0% |" in text
    # The headline counts the site's matmuls, not the readout, whose input stays dense here.
    assert "**25.0% reduction in active parameters.**" in text
    assert "3,000,000 of its 4,000,000 parameters per token" in text
    assert "layer_0.out_proj (10.0% of columns active)" in text
    assert "× the per-token RMS of the inner values" in text
    for name in ("perplexity_vs_sparsity.png", "abs_over_rms_histogram.png", "channel_firing_rates.png"):
        assert (tmp_path / "reports" / name).read_bytes().startswith(PNG_SIGNATURE), name


def test_report_shows_site_speed(tmp_path: Path) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    speed = {"measured": True, "site": "inner", "label": "topk 90% (l1_rms penalty)", "threads": 2,
             "matmuls": [{"name": "backbone.layers.0.mixer.out_proj", "weight_shape": [128, 256], "tokens": 256,
                          "nonzero_share": 0.1, "dense_us_per_token": 40.0, "sparse_us_per_token": 10.0,
                          "speedup": 4.0}]}
    (metrics_dir / "speed_samba.json").write_text(json.dumps(speed))
    text = write_report(metrics_dir, plots_dir, tmp_path / "reports").read_text(encoding="utf-8")

    assert "## Measured speed of the matmuls that read the site (batch 1, this machine)" in text
    assert "| backbone.layers.0.mixer.out_proj | 128 × 256 | 10.0% | 40 | 10 | 4.00× |" in text


def test_report_states_unmeasured_speed(tmp_path: Path) -> None:
    metrics_dir, plots_dir = write_inputs(tmp_path)
    speed = {"measured": False, "site": "ssm_state", "reason": "l1 enforces no zeros"}
    (metrics_dir / "speed_samba.json").write_text(json.dumps(speed))
    text = write_report(metrics_dir, plots_dir, tmp_path / "reports").read_text(encoding="utf-8")

    assert "Not measured: l1 enforces no zeros." in text

