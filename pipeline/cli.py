"""The `samba` command line: one command per DVC stage.

Every command reads params.yaml (validated by pipeline.params); paths default to the
layout that dvc.yaml declares.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer

from pipeline.errors import StageError
from pipeline.params import Params, ParamsError, load_params
from pipeline.workspace import check_params_unchanged
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
# Subfolder of the report stage's output that params report.experiments fills.
EXPERIMENTS_FOLDER = "experiments"


def _run(action: Callable[[], T]) -> T:
    """Run a stage; print a user mistake as one `error:` line and exit with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return action()
    except USER_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    except OSError as error:
        if error.filename is None:
            raise
        # A file-system failure on a named path, e.g. an output folder below a regular file.
        typer.echo(f"error: cannot use {error.filename}: {error.strerror or type(error).__name__} "
                   "(check that the path exists, is a folder where one is expected, and is writable)", err=True)
        raise typer.Exit(code=2) from None


def _load(params_path: Path) -> Params:
    return load_params(params_path)


def _run_stage(params_path: Path, stage: Callable[[Params], T]) -> T:
    """Run a stage on params.yaml as loaded once, and fail if the file changed while it ran.

    Failing (exit status 2) keeps DVC from writing dvc.lock with values the outputs never used.
    """

    def action() -> T:
        params = _load(params_path)
        result = stage(params)
        check_params_unchanged(params_path, params)
        return result

    return _run(action)


@app.command()
def tokenize(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for tokenizer.json, tokens.safetensors and meta.json.")]
    = Path("data/tokens"),
) -> None:
    """Load the corpus (params `data`), train the tokenizer on train and save token ids."""
    from pipeline.stages.tokenize import run_tokenize

    _run_stage(params, lambda loaded: run_tokenize(loaded, out))


@app.command()
def train(
    kind: Annotated[Literal["baseline", "samba"], typer.Option(help="Model to train: the dense baseline or Samba.")],
    params: ParamsOption = Path("params.yaml"),
    tokens: TokensOption = Path("data/tokens"),
    out: Annotated[Path | None, typer.Option(help="Checkpoint folder.", show_default="models/KIND")] = None,
    metrics_dir: MetricsDirOption = Path("metrics"),
    plots_dir: PlotsDirOption = Path("plots"),
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Folder for the resumable training state, saved every train.checkpoint_every steps and "
             "removed when training finishes. The default folder name hashes the params, tokens and code.",
        show_default=".samba/resume/train_KIND-HASH under the project root",
    )] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue from a saved training state of the same config; --no-resume deletes it and starts at step 0."
    )] = True,
    memory_check: Annotated[bool, typer.Option(
        help="Refuse to start when the estimated memory need exceeds the free memory."
    )] = True,
) -> None:
    """Train one model for `train.steps` optimizer steps and save a safetensors checkpoint.

    Rerunning the same command after a crash resumes from the last training state. Under
    torchrun (`torchrun --nproc_per_node N --no-python samba train ...`) the processes split
    train.batch_size between them.
    """
    from pipeline.stages.train import TrainOutputs, run_train
    from samba.train.trainer import NonFiniteLossError

    outputs = TrainOutputs(
        checkpoint=out or Path("models") / kind,
        metrics=metrics_dir / f"train_{kind}.json",
        timing=metrics_dir / f"timing_{kind}.json",
        curve=plots_dir / f"train_{kind}.csv",
    )

    def stage(loaded: Params) -> None:
        run_train(loaded, kind, tokens, outputs, checkpoint_dir=checkpoint_dir, resume_run=resume,
                  check_memory=memory_check)

    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _run_stage(params, stage)
    except NonFiniteLossError as error:
        typer.echo(f"error: training diverged: {error}; lower train.lr or raise train.warmup_steps, "
                   "then rerun (a changed config starts a fresh run)", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        typer.echo("error: training interrupted; rerun the same command to resume from the last training state",
                   err=True)
        raise typer.Exit(code=130) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _raise_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM (sent by torchrun, DVC or a scheduler) into KeyboardInterrupt, so the MLflow run is closed."""
    raise KeyboardInterrupt


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

    _run_stage(params, lambda loaded: run_evaluate(loaded, tokens, baseline, samba, out))


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
    dense: Annotated[bool, typer.Option(
        "--dense", help="Run every matmul dense, also where the checkpoint's topk or magnitude zeros at "
                        "block_output or inner would let decoding multiply only the nonzero inputs.")] = False,
    params: Annotated[Path, typer.Option(
        "--params", help="params.yaml whose eval.seq_len and eval.batch_size calibrate a magnitude "
                         "checkpoint's thresholds; other checkpoints do not read it.")] = Path("params.yaml"),
) -> None:
    """Print text sampled from a trained checkpoint, continuing the prompt.

    A checkpoint trained with topk or magnitude zeros generates with them applied. On the
    CPU, zeros at block_output or inner make decoding multiply only the weight rows of
    nonzero inputs in the layers that read them. The log names those layers.
    """
    from pipeline.stages.generate import run_generate

    text = _run(lambda: run_generate(checkpoint, tokens, prompt, n_tokens, temperature, top_k, seed,
                                     dense=dense, params_path=params))
    typer.echo(text)


@app.command()
def report(
    params: ParamsOption = Path("params.yaml"),
    metrics_dir: MetricsDirOption = Path("metrics"),
    plots_dir: PlotsDirOption = Path("plots"),
    out: Annotated[Path | None, typer.Option(
        help="Output folder [default: reports, or experiments with --experiments].")] = None,
    experiments: Annotated[bool, typer.Option(
        "--experiments", help="Compare all DVC experiments and commits of the repository instead of one run: "
        "a table, a perplexity-vs-sparsity Pareto plot and alpha x lambda heat maps.")] = False,
    split: Annotated[Literal["valid", "test"], typer.Option(
        help="Split that --experiments and params report.experiments compare on.")] = "valid",
) -> None:
    """Write reports/report.md (this run: both models, headline numbers, plots), or with --experiments
    experiments/experiments.md comparing every experiment. With params `report.experiments: true`,
    reports/experiments also gets that comparison."""
    from pipeline.stages.aggregate import AggregateError, write_aggregate_report, write_stage_aggregate
    from pipeline.stages.report import ReportInputError, write_report
    from pipeline.workspace import workspace_root

    def compare_experiments() -> Path:
        try:
            return write_aggregate_report(workspace_root(), out or Path("experiments"), split)
        except AggregateError as error:
            raise StageError(str(error)) from None

    def stage(loaded: Params) -> Path:
        try:
            path = write_report(metrics_dir, plots_dir, out or Path("reports"))
        except ReportInputError as error:
            raise StageError(str(error)) from None
        if loaded.report.experiments:
            try:
                write_stage_aggregate(workspace_root(), path.parent / EXPERIMENTS_FOLDER, split)
            except AggregateError as error:
                raise StageError(f"{error}; set report.experiments: false to skip the comparison") from None
        return path

    path = _run(compare_experiments) if experiments else _run_stage(params, stage)
    typer.echo(f"wrote {path}")
