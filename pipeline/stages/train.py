"""Stages `train_baseline` and `train_samba`: train one model and save its checkpoint."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Literal

from pipeline.errors import StageError
from pipeline.params import Params, flatten
from pipeline.stages.tokenize import load_tokens
from pipeline.tracking import tracked_run
from samba.data.stream import TrainStream
from samba.model import build_model
from samba.sparsity import install_for_training
from samba.train.checkpoint import save_checkpoint
from samba.train.trainer import StepRecord, TrainConfig, seed_everything, train

logger = logging.getLogger(__name__)

ModelKind = Literal["baseline", "samba"]
BASELINE_SECTIONS = ("data", "tokenizer", "model", "train")
SAMBA_SECTIONS = (*BASELINE_SECTIONS, "readout", "loss", "sparsity")


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


def run_train(params: Params, kind: ModelKind, tokens_dir: Path, out_dir: Path, metrics_path: Path,
              timing_path: Path, curve_path: Path) -> dict:
    """Train the `kind` model on the train split and write checkpoint, metrics and curve."""
    ids, meta = load_tokens(tokens_dir)
    train_params = params.train
    seed_everything(train_params.seed)
    mamba = params.model.mamba_config(meta["vocab_size"])
    readout = params.readout.readout_config() if kind == "samba" else None
    model = build_model(kind, mamba, readout)
    sparsity = params.sparsity.sparsity_config() if kind == "samba" else None
    if sparsity is not None:
        install_for_training(model, sparsity)
    try:
        stream = TrainStream(ids["train"], train_params.batch_size, train_params.seq_len)
    except ValueError as error:
        raise StageError(f"train.seq_len / train.batch_size: {error}") from None
    config = TrainConfig(
        steps=train_params.steps, lr=train_params.lr, min_lr=train_params.min_lr,
        warmup_steps=train_params.warmup_steps, weight_decay=train_params.weight_decay,
        grad_clip=train_params.grad_clip, log_every=train_params.log_every,
        readout_weight=params.loss.readout_weight if kind == "samba" else 0.0,
        pruning_weight=params.loss.pruning_weight if kind == "samba" else 0.0,
        penalty=params.sparsity.penalty,
    )
    n_params = model.num_parameters()
    logger.info("training %s: %d parameters, %d steps of %d x %d tokens", kind, n_params, config.steps,
                train_params.batch_size, train_params.seq_len)
    sections = SAMBA_SECTIONS if kind == "samba" else BASELINE_SECTIONS
    records: list[StepRecord] = []
    tags = {"model.kind": kind, "stage": f"train_{kind}", "corpus.source": meta["source"]}
    with tracked_run(params.tracking.enabled, params.tracking.experiment, f"train_{kind}", tags,
                     stage_params(params, sections)) as tracker:

        def on_log(record: StepRecord) -> None:
            records.append(record)
            tracker.log_metrics({**record.losses, "lr": record.lr, "grad_norm": record.grad_norm,
                                 "tokens_per_s": record.tokens_per_s}, step=record.step)

        summary = train(model, stream, config, on_log=on_log)
        save_checkpoint(out_dir, model, kind, mamba, readout,
                        extra={"tokenizer_sha256": meta["tokenizer_sha256"], "steps": summary.steps,
                               "sparsity": sparsity.to_dict() if sparsity is not None else None})
        metrics = {"kind": kind, "steps": summary.steps, "tokens": summary.tokens, "parameters": n_params,
                   "final": summary.final}
        timing = {"train_seconds": round(summary.seconds, 3), "tokens_per_s": round(summary.tokens_per_s, 1)}
        write_json(metrics_path, metrics)
        write_json(timing_path, timing)
        write_curve(curve_path, records)
        tracker.log_metrics({"train_seconds": summary.seconds, "parameters": n_params}, step=summary.steps)
        for path in (metrics_path, curve_path):
            tracker.log_artifact(path)
    logger.info("trained %s in %.1f s (%.0f tokens/s)", kind, summary.seconds, summary.tokens_per_s)
    return metrics
