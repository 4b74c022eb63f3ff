"""Stage `evaluate`: both checkpoints on valid and test with their enforced zeros, plus a post-hoc sweep.

Every perplexity and accuracy is measured with the zeros of the named method applied:
`sparsity_method` names which (for a penalty-only model, none beyond those training made),
and each sweep point applies topk or magnitude at its target on the test split. For Samba
with enforced zeros, the matmuls that read the site are also timed dense and sparse on the
first test windows; those wall-clock times go to speed_samba.json beside the metrics file,
not into the reproducible metrics.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.errors import StageError
from pipeline.params import Params
from pipeline.stages.report_inputs import SPEED_FILE
from pipeline.stages.tokenize import load_tokens
from pipeline.stages.train import BASELINE_SECTIONS, SAMBA_SECTIONS, stage_params, write_json
from pipeline.tracking import tracked_run
from samba.data.stream import eval_windows
from samba.evaluate import calibrate_magnitude, evaluate_split
from samba.sparsity import SparsityConfig, install_config, remove
from samba.sparsity.speed import site_matmul_inputs, time_matvecs
from samba.train.checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("valid", "test")
SPEED_WINDOWS = 2  # Evaluation windows of test tokens whose site vectors are timed.


def _flat_metrics(split: str, metrics: dict) -> dict[str, float]:
    """Pick the scalar metrics worth a column in MLflow, keyed like `test.ppl_token`."""
    flat = {f"{split}.{key}": metrics[key] for key in ("ppl_token", "ppl_word", "accuracy", "nll_per_token")}
    for key, value in metrics["sparsity"]["overall"].items():
        if isinstance(value, (int, float)):
            flat[f"{split}.sparsity.{key}"] = value
    if "readout" in metrics:
        for key in ("ppl_token", "ppl_word", "accuracy"):
            flat[f"{split}.readout.{key}"] = metrics["readout"][key]
        flat[f"{split}.active_params.reduction"] = metrics["active_params"]["reduction"]
    return flat


def _enforce(model, kind: str, sparsity: SparsityConfig, ids: dict, meta: dict, params: Params) -> dict:
    """Install the checkpoint's enforced zeros (or pass-through sparsifiers that mark the site) and describe them."""
    thresholds = None
    if sparsity.method == "magnitude":
        thresholds = calibrate_magnitude(
            model, ids["valid"], kind=kind, site=sparsity.site, target=sparsity.target,
            tokens=sparsity.calibration_tokens, seq_len=params.eval.seq_len,
            batch_size=params.eval.batch_size, eos_id=meta["eos_id"])
    if sparsity.method == "none" and sparsity.site == "ssm_state":
        remove(model)
    else:
        install_config(model, sparsity, thresholds)
    return {"label": sparsity.label, "penalty": sparsity.penalty, "method": sparsity.method, "site": sparsity.site,
            "target": sparsity.target if sparsity.method != "none" else None,
            "zeros_applied": sparsity.method != "none", "thresholds": thresholds}


def _split_ids(params: Params, ids: dict, meta: dict, split: str) -> tuple:
    split_ids = ids[split]
    n_words = meta["splits"][split]["n_words"]
    if params.eval.max_tokens and len(split_ids) > params.eval.max_tokens:
        # Keep the word count proportional, so per-word perplexity stays comparable.
        n_words = round(n_words * params.eval.max_tokens / len(split_ids))
        split_ids = split_ids[: params.eval.max_tokens]
    return split_ids, n_words


def _evaluate(model, kind: str, site: str, params: Params, ids: dict, meta: dict, split: str,
              zeros: str = "") -> dict:
    split_ids, n_words = _split_ids(params, ids, meta, split)
    logger.info("evaluating %s on %s (%d tokens)%s", kind, split, len(split_ids), zeros)
    return evaluate_split(
        model, split_ids, n_words, kind=kind, seq_len=params.eval.seq_len,
        batch_size=params.eval.batch_size, eos_id=meta["eos_id"],
        relative_threshold=params.eval.relative_threshold,
        absolute_threshold=params.eval.absolute_threshold, site=site,
    )


def _sweep(model, kind: str, sparsity: SparsityConfig, params: Params, ids: dict, meta: dict) -> list[dict]:
    """Apply topk and magnitude post hoc at every sweep target and measure the test split with the zeros applied."""
    points = []
    for method in ("magnitude", "topk"):
        for target in sparsity.sweep:
            config = replace(sparsity, method=method, target=target)
            enforced = _enforce(model, kind, config, ids, meta, params)
            metrics = _evaluate(model, kind, sparsity.site, params, ids, meta, "test",
                                zeros=f" with {method} zeros at {target:.0%} post hoc")
            layers = metrics["sparsity"]["layers"].values()
            point = {"method": method, "target": target, "site": sparsity.site, "ppl_token": metrics["ppl_token"],
                     "accuracy": metrics["accuracy"], "thresholds": enforced["thresholds"],
                     "exact_zero_fraction": metrics["sparsity"]["overall"]["exact_zero_fraction"],
                     "min_layer_exact_zero_fraction": min(layer["exact_zero_fraction"] for layer in layers)}
            if "readout" in metrics:
                point["readout_ppl_token"] = metrics["readout"]["ppl_token"]
                point["readout_accuracy"] = metrics["readout"]["accuracy"]
            points.append(point)
    return points


def measure_site_speed(model, kind: str, method: dict, params: Params, ids: dict, meta: dict) -> dict:
    """Time the matmuls that read the site on the first test windows, dense and sparse, with the zeros applied."""
    if not method["zeros_applied"]:
        return {"measured": False, "site": method["site"],
                "reason": f"{method['label']} enforces no zeros, so no matmul input is sparse by construction"}
    windows = eval_windows(ids["test"], params.eval.seq_len, 1, meta["eos_id"])
    inputs = torch.cat([window for window, _ in itertools.islice(windows, SPEED_WINDOWS)])
    matmuls = [{"name": name, **time_matvecs(linear, vectors)}
               for name, linear, vectors in site_matmul_inputs(model, kind, method["site"], inputs)]
    return {"measured": True, "site": method["site"], "label": method["label"], "threads": torch.get_num_threads(),
            "matmuls": matmuls}


def evaluate_checkpoint(params: Params, kind: str, folder: Path, ids: dict, meta: dict,
                        speed_path: Path | None = None) -> dict:
    try:
        model, config = load_checkpoint(folder)
    except CheckpointError as error:
        raise StageError(str(error)) from None
    if config["kind"] != kind:
        raise StageError(f"{folder} holds a {config['kind']} checkpoint, expected {kind}: retrain it")
    if config.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
        raise StageError(f"{folder} was trained with another tokenizer than {meta['description']}'s: "
                         f"rerun `dvc repro` so training uses the current tokens")
    # The baseline trains without sparsity, so it is measured at the site params.yaml names, without zeros.
    sparsity = replace(params.sparsity.sparsity_config(), method="none")
    if kind == "samba" and config.get("sparsity"):
        sparsity = replace(SparsityConfig(**config["sparsity"]), calibration_tokens=params.sparsity.calibration_tokens,
                           sweep=tuple(params.sparsity.sweep))
    results: dict = {"parameters": model.num_parameters()}
    sections = (*(SAMBA_SECTIONS if kind == "samba" else BASELINE_SECTIONS), "eval")
    tags = {"model.kind": kind, "stage": "evaluate", "corpus.source": meta["source"]}
    with tracked_run(params.tracking.enabled, params.tracking.experiment, f"evaluate_{kind}", tags,
                     stage_params(params, sections)) as tracker:
        results["sparsity_method"] = _enforce(model, kind, sparsity, ids, meta, params)
        for split in EVAL_SPLITS:
            results[split] = _evaluate(model, kind, sparsity.site, params, ids, meta, split)
            flat = _flat_metrics(split, results[split])
            tracker.log_metrics(flat)
            # The experiment's parent run gets both models' numbers, so one row compares a sweep point.
            tracker.log_experiment_metrics({f"{kind}.{key}": value for key, value in flat.items()})
        if speed_path is not None:
            # Timed before the sweep, because the sweep installs other zeros. Wall-clock times stay out of the metrics.
            logger.info("timing the matmuls that read the %s values, dense and sparse", sparsity.site)
            write_json(speed_path, measure_site_speed(model, kind, results["sparsity_method"], params, ids, meta))
        results["sweep"] = _sweep(model, kind, sparsity, params, ids, meta)
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
        "samba": evaluate_checkpoint(params, "samba", samba_dir, ids, meta,
                                     speed_path=metrics_path.parent / SPEED_FILE),
    }
    write_json(metrics_path, report)
    for kind in ("baseline", "samba"):
        logger.info("%s test perplexity %.2f", kind, report[kind]["test"]["ppl_token"])
    return report
