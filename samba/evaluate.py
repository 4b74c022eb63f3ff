"""Evaluate a trained model on one split: perplexity, readout accuracy and state sparsity."""

from __future__ import annotations

import torch
from torch import nn

from samba.data.stream import eval_windows
from samba.metrics.active_params import active_parameter_fraction
from samba.metrics.perplexity import NextTokenAccumulator
from samba.metrics.sparsity import SparsityAccumulator


@torch.no_grad()
def evaluate_split(model: nn.Module, ids: torch.Tensor, n_words: int, *, kind: str, seq_len: int,
                   batch_size: int, eos_id: int, relative_threshold: float,
                   absolute_threshold: float) -> dict:
    """Return the metrics of `model` on the token stream `ids`, every token predicted once.

    Each window of `seq_len` tokens starts from a zero state, so a token's context is
    the tokens before it in its window. Per-word perplexity divides the total NLL by
    `n_words` (words plus one end-of-sentence per line), so a BPE model compares with
    word-level ones.
    """
    model.eval()
    backbone = model.backbone if kind == "samba" else model
    n_layers = backbone.config.n_layers
    main = NextTokenAccumulator()
    readout = NextTokenAccumulator() if kind == "samba" else None
    sparsity = SparsityAccumulator(n_layers, relative_threshold, absolute_threshold)
    for inputs, targets in eval_windows(ids, seq_len, batch_size, eos_id):
        output = model(inputs) if kind == "samba" else model(inputs, return_states=True)
        main.update(output.logits, targets)
        if readout is not None:
            readout.update(output.readout_logits, targets)
        sparsity.update(output.states)

    metrics = main.result(n_words)
    metrics["n_words"] = n_words
    measured = sparsity.result()
    metrics["sparsity"] = {
        "overall": measured["overall"],
        "layers": {f"layer_{index}": layer for index, layer in enumerate(measured["layers"])},
    }
    if readout is not None:
        metrics["readout"] = readout.result(n_words)
        metrics["active_params"] = active_parameter_fraction(
            total_params=model.num_parameters(),
            readout_input_weight_shape=tuple(model.readout.input.weight.shape),
            nonzero_features_per_token=measured["overall"]["nonzero_per_token"] * n_layers,
        )
    return metrics
