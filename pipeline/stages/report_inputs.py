"""Load and validate the files the report stage reads: training metrics and curves, evaluation metrics.

Every problem with an input becomes one `ReportInputError` line that names the file and the
stage that writes it, so the user knows which stage to rerun.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

KINDS = ("baseline", "samba")

# Commands that write each input; the `samba` forms follow the CLI in pipeline/cli.py.
_PRODUCERS = {
    "train_baseline": "`dvc repro train_baseline` (or `samba train --kind baseline`)",
    "train_samba": "`dvc repro train_samba` (or `samba train --kind samba`)",
    "evaluate": "`dvc repro evaluate` (or `samba evaluate`)",
}

_CURVE_COLUMNS = {
    "baseline": ("step", "loss_total", "loss_main", "lr", "tokens_per_s"),
    "samba": ("step", "loss_total", "loss_main", "loss_readout", "loss_pruning", "lr", "tokens_per_s"),
}

_LAYER_KEY = re.compile(r"layer_(\d+)")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
SPEED_FILE = "speed_samba.json"


def layer_index(name: str) -> int:
    """Return the index in a layer key such as "layer_3", for sorting layer_10 after layer_9."""
    return int(name.split("_")[1])


class ReportInputError(ValueError):
    """Error for a missing or malformed report input, naming the file and the stage that writes it."""


class _Schema(BaseModel):
    # Other stages may add keys later, and the report reads only the ones below.
    model_config = ConfigDict(extra="ignore", frozen=True)


class FinalLosses(_Schema):
    loss_total: float
    loss_main: float
    loss_readout: float | None = None
    loss_pruning: float | None = None


class TrainTiming(_Schema):
    """Wall-clock figures, kept apart from the metrics so those stay bit-identical across runs."""

    train_seconds: float = Field(ge=0.0)
    tokens_per_s: float = Field(ge=0.0)


class TrainMetrics(_Schema):
    kind: Literal["baseline", "samba"]
    steps: int = Field(ge=0)
    tokens: int = Field(ge=0)
    parameters: int = Field(gt=0)
    final: FinalLosses
    timing: TrainTiming | None = None


class Sparsity(_Schema):
    exact_zero_fraction: Fraction
    near_zero_fraction_relative: Fraction
    near_zero_fraction_absolute: Fraction
    hoyer: float
    mean_abs: float = Field(ge=0.0)
    nonzero_per_token: float = Field(ge=0.0)


class Histogram(_Schema):
    log10_edges: list[float] = Field(min_length=2)
    counts: list[int]
    exact_zeros: int = Field(ge=0)


class LayerSparsity(Sparsity):
    dead_fraction: Fraction | None = None
    channel_firing_rate: list[float] | None = None


class OverallSparsity(Sparsity):
    dead_fraction: Fraction | None = None
    mean_abs_over_rms: float | None = None
    abs_over_rms_histogram: Histogram | None = None


class SparsityReport(_Schema):
    site: Literal["ssm_state", "block_output", "inner"] = "ssm_state"
    overall: OverallSparsity
    layers: dict[str, LayerSparsity] = Field(min_length=1)

    def ordered_layers(self) -> list[tuple[str, Sparsity]]:
        """Return the layers sorted by index."""
        return sorted(self.layers.items(), key=lambda item: layer_index(item[0]))


class ReadoutMetrics(_Schema):
    nll_per_token: float
    ppl_token: float = Field(gt=0.0)
    ppl_word: float = Field(gt=0.0)
    accuracy: Fraction


class ActiveParams(_Schema):
    total: int = Field(gt=0)
    active: float = Field(ge=0.0)
    active_fraction: Fraction
    reduction: Fraction
    readout_input_active_fraction: Fraction


class MatmulActivity(_Schema):
    name: str
    weight_shape: list[int]
    active_column_fraction: Fraction
    counted: bool = True


class SiteActiveParams(_Schema):
    total: int = Field(gt=0)
    active: float = Field(ge=0.0)
    reduction: Fraction
    matmuls: list[MatmulActivity]


class SparsityMethod(_Schema):
    """How the evaluated numbers were measured: which enforced zeros were applied, at which site."""

    label: str
    penalty: str
    method: Literal["none", "topk", "magnitude"]
    site: Literal["ssm_state", "block_output", "inner"]
    target: float | None = None
    zeros_applied: bool


class SweepPoint(_Schema):
    """One post-hoc enforcement on the test split, measured with its zeros applied."""

    method: Literal["topk", "magnitude"]
    target: Fraction
    ppl_token: float = Field(gt=0.0)
    accuracy: Fraction
    exact_zero_fraction: Fraction
    min_layer_exact_zero_fraction: Fraction
    readout_ppl_token: float | None = None


class SplitMetrics(_Schema):
    n_tokens: int = Field(gt=0)
    n_words: int = Field(gt=0)
    nll_per_token: float
    ppl_token: float = Field(gt=0.0)
    ppl_word: float = Field(gt=0.0)
    accuracy: Fraction
    sparsity: SparsityReport
    readout: ReadoutMetrics | None = None
    active_params: ActiveParams | None = None
    site_active_params: SiteActiveParams | None = None


class MatmulSpeed(_Schema):
    """One matmul that reads the site, timed dense and sparse at batch 1 on the model's own zeros."""

    name: str
    weight_shape: list[int]
    tokens: int = Field(gt=0)
    nonzero_share: Fraction
    dense_us_per_token: float = Field(gt=0)
    sparse_us_per_token: float = Field(gt=0)
    speedup: float = Field(gt=0)


class SiteSpeed(_Schema):
    """Wall-clock timing of the site's matmuls written by the evaluate stage (speed_samba.json)."""

    measured: bool
    site: str
    label: str | None = None
    reason: str | None = None
    threads: int | None = None
    matmuls: list[MatmulSpeed] = []


class ModelEval(_Schema):
    parameters: int = Field(gt=0)
    valid: SplitMetrics
    test: SplitMetrics
    sparsity_method: SparsityMethod | None = None
    sweep: list[SweepPoint] = []


class Corpus(_Schema):
    source: Literal["hub", "local", "synthetic"]
    description: str
    tokenizer: Literal["word", "bpe"]
    vocab_size: int = Field(gt=0)


class Thresholds(_Schema):
    relative: float = Field(gt=0.0)
    absolute: float = Field(gt=0.0)


class EvalMetrics(_Schema):
    corpus: Corpus
    thresholds: Thresholds
    baseline: ModelEval
    samba: ModelEval


@dataclass(frozen=True)
class ReportInputs:
    """Validated contents of all report inputs."""

    train: dict[str, TrainMetrics]
    curves: dict[str, dict[str, list[float]]]
    evaluation: EvalMetrics
    speed: SiteSpeed | None = None


def _input_error(path: Path, problem: str, stage: str) -> ReportInputError:
    verb = "Run" if problem == "not found" else "Rerun"
    when = " first" if problem == "not found" else ""
    return ReportInputError(f"{path} {problem}. {verb} {_PRODUCERS[stage]}{when}.")


def _read_text(path: Path, stage: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _input_error(path, "not found", stage) from None
    except (OSError, UnicodeDecodeError) as err:
        raise _input_error(path, f"cannot be read ({err})", stage) from err


def _load_json(path: Path, schema: type[_Schema], stage: str) -> _Schema:
    text = _read_text(path, stage)
    try:
        return schema.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        problem = f"is invalid at key `{key}` ({first['msg']})"
        if first["type"] == "json_invalid":
            problem = f"is not valid JSON ({first['msg']})"
        raise _input_error(path, problem, stage) from err


def _splits(evaluation: EvalMetrics) -> Iterator[tuple[str, SplitMetrics]]:
    for kind in KINDS:
        model = getattr(evaluation, kind)
        yield f"{kind}.valid", model.valid
        yield f"{kind}.test", model.test


def _check_evaluation(path: Path, evaluation: EvalMetrics) -> None:
    """Check the layer key names and the Samba-only sections, which the schema cannot express."""
    for prefix, metrics in _splits(evaluation):
        for name in metrics.sparsity.layers:
            if _LAYER_KEY.fullmatch(name) is None:
                key = f"{prefix}.sparsity.layers.{name}"
                raise _input_error(path, f"is invalid at key `{key}` (expected layer_<index>)", "evaluate")
        if not prefix.startswith("samba."):
            continue
        for section in ("readout", "active_params"):
            if getattr(metrics, section) is None:
                raise _input_error(path, f"is invalid at key `{prefix}.{section}` (missing)", "evaluate")


def load_curve(path: Path, kind: str) -> dict[str, list[float]]:
    """Read a per-step training log into one float list per column (step included)."""
    stage = f"train_{kind}"
    lines = _read_text(path, stage).splitlines()
    reader = csv.DictReader(lines)
    missing = [name for name in _CURVE_COLUMNS[kind] if name not in (reader.fieldnames or [])]
    if missing:
        raise _input_error(path, f"is missing the column(s) {', '.join(missing)}", stage)

    columns: dict[str, list[float]] = {name: [] for name in _CURVE_COLUMNS[kind]}
    for line_number, row in enumerate(reader, start=2):
        for name in columns:
            if row[name] is None:
                raise _input_error(path, f"has no {name} value on line {line_number}", stage)
            try:
                columns[name].append(float(row[name]))
            except ValueError:
                problem = f"has a non-numeric {name} ({row[name]!r}) on line {line_number}"
                raise _input_error(path, problem, stage) from None
    if not columns["step"]:
        raise _input_error(path, "contains no logged steps", stage)
    return columns


def load_report_inputs(metrics_dir: Path, plots_dir: Path) -> ReportInputs:
    """Read and validate all report inputs, raising ReportInputError on the first problem."""
    train: dict[str, TrainMetrics] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for kind in KINDS:
        stage = f"train_{kind}"
        path = metrics_dir / f"{stage}.json"
        metrics = _load_json(path, TrainMetrics, stage)
        if metrics.kind != kind:
            problem = f"is invalid at key `kind` (expected {kind!r}, found {metrics.kind!r})"
            raise _input_error(path, problem, stage)
        if kind == "samba" and (metrics.final.loss_readout is None or metrics.final.loss_pruning is None):
            problem = "is invalid at key `final` (loss_readout and loss_pruning are required)"
            raise _input_error(path, problem, stage)
        timing = _load_json(metrics_dir / f"timing_{kind}.json", TrainTiming, stage)
        train[kind] = metrics.model_copy(update={"timing": timing})
        curves[kind] = load_curve(plots_dir / f"{stage}.csv", kind)

    eval_path = metrics_dir / "evaluate.json"
    evaluation = _load_json(eval_path, EvalMetrics, "evaluate")
    _check_evaluation(eval_path, evaluation)
    # Optional: reports of runs evaluated before the stage timed the site's matmuls have none.
    speed_path = metrics_dir / SPEED_FILE
    speed = _load_json(speed_path, SiteSpeed, "evaluate") if speed_path.is_file() else None
    return ReportInputs(train=train, curves=curves, evaluation=evaluation, speed=speed)
