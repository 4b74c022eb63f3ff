"""Stages `train_baseline` and `train_samba`: train one model and save its checkpoint.

A run saves its training state every `train.checkpoint_every` steps into a folder
outside DVC's outputs (see pipeline.resume), and the same command resumes from it after
a crash, with the same MLflow run. Under torchrun, every process trains its share of the
global batch and rank 0 alone reads and writes files and talks to MLflow.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline import resume
from pipeline.errors import StageError
from pipeline.params import Params, TrainParams, flatten
from pipeline.stages.tokenize import load_tokens
from pipeline.tracking import Tracker, project_root, tracked_run
from samba.data.stream import TrainStream
from samba.model import MambaConfig, ReadoutConfig, build_model
from samba.sparsity import install_for_training
from samba.train.checkpoint import save_checkpoint
from samba.train.distributed import (
    DistributedContext,
    context_from_env,
    destroy_process_group,
    device_for,
    init_process_group,
)
from samba.train.memory import available_memory, estimate_training_memory, format_bytes
from samba.train.trainer import StepRecord, TrainConfig, TrainSummary, seed_everything, train

logger = logging.getLogger(__name__)

ModelKind = Literal["baseline", "samba"]
BASELINE_SECTIONS = ("data", "tokenizer", "model", "train")
SAMBA_SECTIONS = (*BASELINE_SECTIONS, "readout", "loss", "sparsity")


@dataclass(frozen=True)
class TrainOutputs:
    """The stage's outputs: the checkpoint folder and three files."""

    checkpoint: Path
    metrics: Path
    timing: Path
    curve: Path

    def folders(self) -> list[tuple[Path, str]]:
        """Return each output folder with the CLI option that sets it."""
        return [(self.checkpoint, "--out"), (self.metrics.parent, "--metrics-dir"),
                (self.timing.parent, "--metrics-dir"), (self.curve.parent, "--plots-dir")]


def stage_params(params: Params, sections: tuple[str, ...]) -> dict:
    """Flatten only the sections a stage uses, so MLflow shows what shaped the run."""
    dumped = params.model_dump()
    return flatten({section: dumped[section] for section in sections})


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_curve(path: Path, records: list[StepRecord]) -> None:
    """Write the per-interval training curve as CSV for `dvc plots` and the report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    loss_keys = list(records[0].losses) if records else ["loss_total", "loss_main"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *loss_keys, "lr", "tokens_per_s"])
        for record in records:
            writer.writerow([record.step, *(f"{record.losses[key]:.6f}" for key in loss_keys),
                             f"{record.lr:.6e}", f"{record.tokens_per_s:.1f}"])


def check_writable(folder: Path, option: str) -> None:
    """Create `folder` and a file in it, so an unwritable output fails before training, not after."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise StageError(f"cannot write to {folder} ({error.strerror or type(error).__name__}): "
                         f"choose a writable folder with {option}") from None


def run_train(params: Params, kind: ModelKind, tokens_dir: Path, outputs: TrainOutputs, *,
              checkpoint_dir: Path | None = None, resume_run: bool = True, check_memory: bool = True) -> dict | None:
    """Train the `kind` model on the train split and write checkpoint, metrics and curve.

    Returns the metrics on rank 0 and None on the other ranks. `checkpoint_dir` overrides
    the folder of the resumable training state. `resume_run=False` discards a saved state.
    """
    context = _distributed_context(params.train)
    if not context.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if context.is_main:
        for folder, option in outputs.folders():
            check_writable(folder, option)
    ids, meta = load_tokens(tokens_dir)
    device = _device(params.train, context)
    seed_everything(params.train.seed)
    mamba = params.model.mamba_config(meta["vocab_size"])
    readout = params.readout.readout_config() if kind == "samba" else None
    if check_memory:
        _check_memory(kind, mamba, readout, params.train, context, device)
    try:
        stream = TrainStream(ids["train"], params.train.batch_size, params.train.seq_len,
                             rank=context.rank, world_size=context.world_size)
    except ValueError as error:
        raise StageError(f"train.seq_len / train.batch_size: {error}") from None
    config = _train_config(params, kind)
    if context.is_distributed:
        init_process_group(context, device)
    try:
        model = build_model(kind, mamba, readout).to(device)
        if kind == "samba":
            install_for_training(model, params.sparsity.sparsity_config())
        if not context.is_main:
            train(model, stream, config, context=context)
            return None
        sections = SAMBA_SECTIONS if kind == "samba" else BASELINE_SECTIONS
        flat = stage_params(params, sections)
        key = resume.resume_key(kind, flat, tokens_dir)
        folder = checkpoint_dir or resume.default_resume_folder(project_root(), kind, key)
        with resume.locked_folder(folder):
            if not resume_run:
                resume.discard_state(folder)
            resume.check_state_key(folder, key)
            metrics = _train_tracked(params, kind, model, stream, config, meta, outputs, folder, flat, key, context)
            resume.discard_state(folder)
        resume.remove_folder(folder)
        return metrics
    finally:
        destroy_process_group()


def _train_tracked(params: Params, kind: ModelKind, model: torch.nn.Module, stream: TrainStream,
                   config: TrainConfig, meta: dict, outputs: TrainOutputs, folder: Path, flat: dict, key: str,
                   context: DistributedContext) -> dict:
    """Train inside the MLflow run (reopened after a crash) and write the outputs (rank 0)."""
    n_params = model.num_parameters()
    logger.info("training %s: %d parameters, %d steps of %d x %d tokens on %d process(es); training state in %s",
                kind, n_params, config.steps, stream.batch_size, stream.seq_len, context.world_size, folder)
    tags = {"model.kind": kind, "stage": f"train_{kind}", "corpus.source": meta["source"]}
    with tracked_run(params.tracking.enabled, params.tracking.experiment, f"train_{kind}", tags, flat,
                     resume_run_id=resume.read_run_id(folder)) as tracker:
        if tracker.run_id is not None:
            resume.write_run_id(folder, tracker.run_id)
        summary = train(model, stream, config, on_log=_metric_logger(tracker), checkpoint_dir=folder,
                        state_extra={resume.KEY_FIELD: key}, context=context)
        metrics = _write_outputs(kind, model.cpu(), summary, n_params, meta, outputs, params)
        tracker.log_metrics({"train_seconds": summary.seconds, "parameters": n_params}, step=summary.steps)
        for path in (outputs.metrics, outputs.curve):
            tracker.log_artifact(path)
    logger.info("trained %s in %.1f s (%.0f tokens/s)", kind, summary.seconds, summary.tokens_per_s)
    return metrics


def _metric_logger(tracker: Tracker) -> Callable[[StepRecord], None]:
    """Log each record to MLflow, except the steps an interrupted attempt already logged.

    A resumed run recomputes the steps between its last training state and the crash,
    with bit-identical values, so skipping them leaves one point per step.
    """
    already_logged = tracker.max_logged_step("loss_total")

    def on_log(record: StepRecord) -> None:
        if record.step > already_logged:
            tracker.log_metrics({**record.losses, "lr": record.lr, "grad_norm": record.grad_norm,
                                 "tokens_per_s": record.tokens_per_s}, step=record.step)

    return on_log


def _write_outputs(kind: ModelKind, model: torch.nn.Module, summary: TrainSummary, n_params: int, meta: dict,
                   outputs: TrainOutputs, params: Params) -> dict:
    readout = params.readout.readout_config() if kind == "samba" else None
    mamba = params.model.mamba_config(meta["vocab_size"])
    sparsity = params.sparsity.sparsity_config() if kind == "samba" else None
    save_checkpoint(outputs.checkpoint, model, kind, mamba, readout,
                    extra={"tokenizer_sha256": meta["tokenizer_sha256"], "steps": summary.steps,
                           "sparsity": sparsity.to_dict() if sparsity is not None else None})
    metrics = {"kind": kind, "steps": summary.steps, "tokens": summary.tokens, "parameters": n_params,
               "final": summary.final}
    timing = {"train_seconds": round(summary.seconds, 3), "tokens_per_s": round(summary.tokens_per_s, 1)}
    write_json(outputs.metrics, metrics)
    write_json(outputs.timing, timing)
    write_curve(outputs.curve, summary.records)
    return metrics


def _train_config(params: Params, kind: ModelKind) -> TrainConfig:
    train_params = params.train
    return TrainConfig(
        steps=train_params.steps, lr=train_params.lr, min_lr=train_params.min_lr,
        warmup_steps=train_params.warmup_steps, weight_decay=train_params.weight_decay,
        grad_clip=train_params.grad_clip, log_every=train_params.log_every,
        readout_weight=params.loss.readout_weight if kind == "samba" else 0.0,
        pruning_weight=params.loss.pruning_weight if kind == "samba" else 0.0,
        checkpoint_every=train_params.checkpoint_every,
        penalty=params.sparsity.penalty,
    )


def _distributed_context(train_params: TrainParams) -> DistributedContext:
    try:
        context = context_from_env()
    except ValueError as error:
        raise StageError(str(error)) from None
    if train_params.batch_size % context.world_size:
        raise StageError(f"train.batch_size={train_params.batch_size} does not split evenly over "
                         f"{context.world_size} training processes (WORLD_SIZE): set train.batch_size "
                         f"to a multiple of {context.world_size} or start another number of processes")
    return context


def _device(train_params: TrainParams, context: DistributedContext) -> torch.device:
    if train_params.device == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is cuda but PyTorch finds no CUDA GPU: set train.device to cpu "
                         "or install a CUDA build of PyTorch")
    if train_params.device == "cuda" and context.local_rank >= torch.cuda.device_count():
        raise StageError(f"LOCAL_RANK={context.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                         "start at most one process per GPU (torchrun --nproc_per_node)")
    return device_for(context, train_params.device)


def _check_memory(kind: ModelKind, mamba: MambaConfig, readout: ReadoutConfig | None, train_params: TrainParams,
                  context: DistributedContext, device: torch.device) -> None:
    """Refuse a config whose estimated memory need exceeds what the device has free."""
    local_batch = train_params.batch_size // context.world_size
    estimate = estimate_training_memory(kind, mamba, readout, local_batch, train_params.seq_len)
    free = available_memory(device)
    if free is None:
        logger.warning("cannot read the free memory of %s; skipping the memory check", device)
        return
    # Processes on one machine share its memory, but each GPU has its own.
    sharing = context.local_world_size if device.type == "cpu" else 1
    needed = estimate.total * sharing
    logger.info("estimated memory need per process %s; %s free on %s", estimate.describe(), format_bytes(free), device)
    if needed > free:
        processes = f" x {sharing} processes" if sharing > 1 else ""
        raise StageError(
            f"training {kind} needs an estimated {estimate.describe()}{processes} at a batch of "
            f"{local_batch} x {train_params.seq_len} tokens per process, but {device.type} has "
            f"{format_bytes(free)} free: lower train.batch_size, train.seq_len, model.d_model, model.d_state "
            "or model.n_layers, or pass --no-memory-check to try anyway")
