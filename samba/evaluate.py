"""Evaluate a trained model on one split: perplexity, readout accuracy and site sparsity.

Every number is measured on the model as it runs, so when sparsifiers are installed
(samba.sparsity.install) the perplexities, accuracies and sparsity numbers all have the
enforced zeros applied.
"""

from __future__ import annotations

import torch
from torch import nn

from samba.data.stream import eval_windows
from samba.metrics.active_params import active_parameter_fraction, matmul_active_parameters
from samba.metrics.perplexity import NextTokenAccumulator
from samba.metrics.sparsity import SparsityAccumulator
from samba.sparsity import SITE_TOKEN_DIMS, calibrate_thresholds, install, record_sites
from samba.sparsity.sparsifier import subsample


def _forward(model: nn.Module, inputs: torch.Tensor, kind: str) -> tuple:
    """Run the model and return its output and the site values: recorded sparsifier outputs, else the states."""
    with record_sites(model) as recorded:
        output = model(inputs) if kind == "samba" else model(inputs, return_states=True)
    return output, (list(recorded) if recorded else output.states)


@torch.no_grad()
def evaluate_split(model: nn.Module, ids: torch.Tensor, n_words: int, *, kind: str, seq_len: int,
                   batch_size: int, eos_id: int, relative_threshold: float,
                   absolute_threshold: float, site: str = "ssm_state") -> dict:
    """Return the metrics of `model` on the token stream `ids`, every token predicted once.

    Each window of `seq_len` tokens starts from a zero state, so a token's context is
    the tokens before it in its window. Per-word perplexity divides the total NLL by
    `n_words` (words plus one end-of-sentence per line), so a BPE model compares with
    word-level ones. Sparsity is measured on the `site` tensors; for a site other than
    ssm_state a sparsifier (pass-through at least) must be installed there.
    """
    model.eval()
    backbone = model.backbone if kind == "samba" else model
    n_layers = backbone.config.n_layers
    main = NextTokenAccumulator()
    readout = NextTokenAccumulator() if kind == "samba" else None
    sparsity = SparsityAccumulator(n_layers, relative_threshold, absolute_threshold, token_dims=SITE_TOKEN_DIMS[site])
    for inputs, targets in eval_windows(ids, seq_len, batch_size, eos_id):
        output, values = _forward(model, inputs, kind)
        main.update(output.logits, targets)
        if readout is not None:
            readout.update(output.readout_logits, targets)
        sparsity.update(values)

    metrics = main.result(n_words)
    metrics["n_words"] = n_words
    measured = sparsity.result()
    metrics["sparsity"] = {
        "site": site,
        "overall": measured["overall"],
        "layers": {f"layer_{index}": layer for index, layer in enumerate(measured["layers"])},
    }
    per_layer_nonzeros = [layer["nonzero_per_token"] for layer in measured["layers"]]
    if readout is not None:
        metrics["readout"] = readout.result(n_words)
        # The readout reads dense states unless the site is ssm_state.
        state_nonzeros = measured["overall"]["nonzero_per_token"] * n_layers if site == "ssm_state" else None
        metrics["active_params"] = active_parameter_fraction(
            total_params=model.num_parameters(),
            readout_input_weight_shape=tuple(model.readout.input.weight.shape),
            nonzero_features_per_token=state_nonzeros if state_nonzeros is not None else model.readout.num_features,
        )
    metrics["site_active_params"] = matmul_active_parameters(model.num_parameters(),
                                                             site_matmuls(model, kind, site, per_layer_nonzeros))
    return metrics


def site_matmuls(model: nn.Module, kind: str, site: str, per_layer_nonzeros: list[float]) -> list[dict]:
    """List the matmuls whose input is the site tensor, with the measured nonzero inputs per token.

    ssm_state feeds the readout's first layer (all layers' states at once), inner feeds
    each layer's out_proj, and block_output feeds the next layer's in_proj and, after the
    last layer, the tied LM head.
    """
    backbone = model.backbone if kind == "samba" else model
    if site == "ssm_state":
        if kind != "samba":
            return []
        weight = model.readout.input.weight
        return [{"name": "readout.input", "out_features": weight.shape[0], "in_features": weight.shape[1],
                 "nonzero_inputs": sum(per_layer_nonzeros)}]
    matmuls = []
    for index, layer in enumerate(backbone.layers):
        if site == "inner":
            weight = layer.mixer.out_proj.weight
            name = f"layer_{index}.out_proj"
        elif index + 1 < len(backbone.layers):
            weight = backbone.layers[index + 1].mixer.in_proj.weight
            name = f"layer_{index + 1}.in_proj"
        else:
            weight = backbone.lm_head.weight
            name = "lm_head"
        matmuls.append({"name": name, "out_features": weight.shape[0], "in_features": weight.shape[1],
                        "nonzero_inputs": per_layer_nonzeros[index], "counted": name != "lm_head"})
    return matmuls


@torch.no_grad()
def calibrate_magnitude(model: nn.Module, ids: torch.Tensor, *, kind: str, site: str, target: float,
                        tokens: int, seq_len: int, batch_size: int, eos_id: int,
                        max_values: int = 4_000_000) -> list[float]:
    """Return per-layer thresholds that zero a `target` share of the site values on the first `tokens` of `ids`.

    The site runs without zeros while calibrating (a pass-through sparsifier), and at
    most about `max_values` values per layer and batch, evenly strided, enter each quantile.
    """
    model.eval()
    install(model, site, "none")
    chunks: list[list[torch.Tensor]] = []
    for inputs, _ in eval_windows(ids[:tokens], seq_len, batch_size, eos_id):
        _, values = _forward(model, inputs, kind)
        if not chunks:
            chunks = [[] for _ in values]
        for layer_chunks, tensor in zip(chunks, values):
            layer_chunks.append(subsample(tensor, max_values))
    if not chunks:
        raise ValueError(f"no calibration windows: {tokens} tokens are too few for seq_len {seq_len}")
    return calibrate_thresholds(chunks, target)
