"""Stage `evaluate`: both checkpoints on valid and test, written as one metrics file."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import StageError
from pipeline.params import Params
from pipeline.stages.tokenize import load_tokens
from pipeline.stages.train import BASELINE_SECTIONS, SAMBA_SECTIONS, stage_params, write_json
from pipeline.tracking import tracked_run
from samba.evaluate import evaluate_split
from samba.train.checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("valid", "test")


def _flat_metrics(split: str, metrics: dict) -> dict[str, float]:
    """Pick the scalar metrics worth a column in MLflow, keyed like `test.ppl_token`."""
    flat = {f"{split}.{key}": metrics[key] for key in ("ppl_token", "ppl_word", "accuracy", "nll_per_token")}
    for key, value in metrics["sparsity"]["overall"].items():
        flat[f"{split}.sparsity.{key}"] = value
    if "readout" in metrics:
        for key in ("ppl_token", "ppl_word", "accuracy"):
            flat[f"{split}.readout.{key}"] = metrics["readout"][key]
        flat[f"{split}.active_params.reduction"] = metrics["active_params"]["reduction"]
    return flat


def evaluate_checkpoint(params: Params, kind: str, folder: Path, ids: dict, meta: dict) -> dict:
    try:
        model, config = load_checkpoint(folder)
    except CheckpointError as error:
        raise StageError(str(error)) from None
    if config["kind"] != kind:
        raise StageError(f"{folder} holds a {config['kind']} checkpoint, expected {kind}: retrain it")
    if config.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
        raise StageError(f"{folder} was trained with another tokenizer than {meta['description']}'s: "
                         f"rerun `dvc repro` so training uses the current tokens")
    results: dict = {"parameters": model.num_parameters()}
    sections = (*(SAMBA_SECTIONS if kind == "samba" else BASELINE_SECTIONS), "eval")
    tags = {"model.kind": kind, "stage": "evaluate", "corpus.source": meta["source"]}
    with tracked_run(params.tracking.enabled, params.tracking.experiment, f"evaluate_{kind}", tags,
                     stage_params(params, sections)) as tracker:
        for split in EVAL_SPLITS:
            split_ids = ids[split]
            n_words = meta["splits"][split]["n_words"]
            if params.eval.max_tokens and len(split_ids) > params.eval.max_tokens:
                # Keep the word count proportional, so per-word perplexity stays comparable.
                n_words = round(n_words * params.eval.max_tokens / len(split_ids))
                split_ids = split_ids[: params.eval.max_tokens]
            logger.info("evaluating %s on %s (%d tokens)", kind, split, len(split_ids))
            results[split] = evaluate_split(
                model, split_ids, n_words, kind=kind, seq_len=params.eval.seq_len,
                batch_size=params.eval.batch_size, eos_id=meta["eos_id"],
                relative_threshold=params.eval.relative_threshold,
                absolute_threshold=params.eval.absolute_threshold,
            )
            flat = _flat_metrics(split, results[split])
            tracker.log_metrics(flat)
            # The experiment's parent run gets both models' numbers, so one row compares a sweep point.
            tracker.log_experiment_metrics({f"{kind}.{key}": value for key, value in flat.items()})
    return results


def run_evaluate(params: Params, tokens_dir: Path, baseline_dir: Path, samba_dir: Path,
                 metrics_path: Path) -> dict:
    """Evaluate both models and write metrics_path (the report's main input)."""
    ids, meta = load_tokens(tokens_dir)
    report = {
        "corpus": {"source": meta["source"], "description": meta["description"],
                   "tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"]},
        "thresholds": {"relative": params.eval.relative_threshold, "absolute": params.eval.absolute_threshold},
        "baseline": evaluate_checkpoint(params, "baseline", baseline_dir, ids, meta),
        "samba": evaluate_checkpoint(params, "samba", samba_dir, ids, meta),
    }
    write_json(metrics_path, report)
    for kind in ("baseline", "samba"):
        logger.info("%s test perplexity %.2f", kind, report[kind]["test"]["ppl_token"])
    return report
