"""The `samba` command line: one command per DVC stage.

Every command reads params.yaml (validated by pipeline.params); paths default to the
layout that dvc.yaml declares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer

from pipeline.errors import StageError
from pipeline.params import Params, ParamsError, load_params
from samba.data.corpus import CorpusError
from samba.train.checkpoint import CheckpointError

app = typer.Typer(
    help="Train and compare a dense Mamba baseline and Samba (sparse SSM states + readout).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read (all settings live there).")]
TokensOption = Annotated[Path, typer.Option("--tokens", help="Folder with the tokenize stage's outputs.")]
MetricsDirOption = Annotated[Path, typer.Option("--metrics-dir", help="Folder for metrics JSON files.")]
PlotsDirOption = Annotated[Path, typer.Option("--plots-dir", help="Folder for training-curve CSV files.")]

USER_ERRORS = (ParamsError, StageError, CorpusError, CheckpointError)


def _run(action: Callable[[], T]) -> T:
    """Run a stage; print a user mistake as one `error:` line and exit with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return action()
    except USER_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    except PermissionError as error:
        typer.echo(f"error: cannot write {error.filename}: permission denied (choose a writable folder)", err=True)
        raise typer.Exit(code=2) from None


def _load(params_path: Path) -> Params:
    return load_params(params_path)


@app.command()
def tokenize(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for tokenizer.json, tokens.safetensors and meta.json.")]
    = Path("data/tokens"),
) -> None:
    """Load the corpus (params `data`), train the tokenizer on train and save token ids."""
    from pipeline.stages.tokenize import run_tokenize

    _run(lambda: run_tokenize(_load(params), out))


@app.command()
def train(
    kind: Annotated[Literal["baseline", "samba"], typer.Option(help="Model to train: the dense baseline or Samba.")],
    params: ParamsOption = Path("params.yaml"),
    tokens: TokensOption = Path("data/tokens"),
    out: Annotated[Path | None, typer.Option(help="Checkpoint folder [default: models/KIND].")] = None,
    metrics_dir: MetricsDirOption = Path("metrics"),
    plots_dir: PlotsDirOption = Path("plots"),
) -> None:
    """Train one model for `train.steps` optimizer steps and save a safetensors checkpoint."""
    from pipeline.stages.train import run_train

    _run(lambda: run_train(
        _load(params), kind, tokens, out or Path("models") / kind,
        metrics_path=metrics_dir / f"train_{kind}.json",
        timing_path=metrics_dir / f"timing_{kind}.json",
        curve_path=plots_dir / f"train_{kind}.csv",
    ))


@app.command()
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    tokens: TokensOption = Path("data/tokens"),
    baseline: Annotated[Path, typer.Option(help="Baseline checkpoint folder.")] = Path("models/baseline"),
    samba: Annotated[Path, typer.Option(help="Samba checkpoint folder.")] = Path("models/samba"),
    out: Annotated[Path, typer.Option(help="Metrics JSON to write.")] = Path("metrics/evaluate.json"),
) -> None:
    """Measure perplexity (per token and per word), readout accuracy and state sparsity on valid and test."""
    from pipeline.stages.evaluate import run_evaluate

    _run(lambda: run_evaluate(_load(params), tokens, baseline, samba, out))


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder written by `samba train`.")]
    = Path("models/baseline"),
    tokens: TokensOption = Path("data/tokens"),
    prompt: Annotated[str, typer.Option(help="Text to continue; an empty prompt starts a new sentence.")] = "",
    n_tokens: Annotated[int, typer.Option("--n-tokens", help="Number of tokens to generate.")] = 50,
    temperature: Annotated[float, typer.Option(help="Divisor of the logits before sampling, > 0; "
                                                    "lower values pick likely tokens more often.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens only; "
                                                       "0 samples from the whole vocabulary.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the sampler: the same seed gives the same text.")] = 0,
) -> None:
    """Print text sampled from a trained checkpoint, continuing the prompt."""
    from pipeline.stages.generate import run_generate

    text = _run(lambda: run_generate(checkpoint, tokens, prompt, n_tokens, temperature, top_k, seed))
    typer.echo(text)


@app.command()
def report(
    metrics_dir: MetricsDirOption = Path("metrics"),
    plots_dir: PlotsDirOption = Path("plots"),
    out: Annotated[Path, typer.Option(help="Folder for report.md and its PNG plots.")] = Path("reports"),
) -> None:
    """Write reports/report.md: the comparison table, headline numbers and plots."""
    from pipeline.stages.report import ReportInputError, write_report

    def action() -> Path:
        try:
            return write_report(metrics_dir, plots_dir, out)
        except ReportInputError as error:
            raise StageError(str(error)) from None

    path = _run(action)
    typer.echo(f"wrote {path}")
