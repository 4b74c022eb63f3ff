"""Next-token negative log-likelihood, perplexity and top-1 accuracy over many batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class NextTokenAccumulator:
    """Summed NLL (float64), token count and top-1 hits over batches of next-token predictions."""

    def __init__(self) -> None:
        self.nll_sum = 0.0
        self.n_tokens = 0
        self.n_correct = 0

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add logits (batch, length, vocab) scored against targets (batch, length)."""
        if logits.dim() != 3 or targets.shape != logits.shape[:2]:
            raise ValueError(f"expected logits (batch, length, vocab) and targets (batch, length), "
                             f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
        # log-softmax in float32 at least (float64 logits stay float64); the sum runs in float64.
        logits = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_targets = targets.reshape(-1).long()
        nll = F.cross_entropy(flat_logits, flat_targets, reduction="none")
        self.nll_sum += nll.to(torch.float64).sum().item()
        self.n_tokens += flat_targets.numel()
        # argmax returns the first maximum, so ties go to the lowest id.
        self.n_correct += int((flat_logits.argmax(dim=-1) == flat_targets).sum().item())

    def result(self, n_words: int | None = None) -> dict:
        """Return nll_per_token, ppl_token, accuracy, n_tokens, and ppl_word when n_words is given.

        ppl_word = exp(total NLL / n_words), where n_words counts words plus one
        end-of-sentence per line, so models with different tokenizers compare.
        A perplexity too large for a float is returned as math.inf.
        """
        if self.n_tokens == 0:
            raise ValueError("no predictions were added: call update() with at least one batch first")
        nll_per_token = self.nll_sum / self.n_tokens
        metrics = {
            "nll_per_token": nll_per_token,
            "ppl_token": _exp(nll_per_token),
            "accuracy": self.n_correct / self.n_tokens,
            "n_tokens": self.n_tokens,
        }
        if n_words is not None:
            if n_words <= 0:
                raise ValueError(f"n_words must be positive, got {n_words}")
            metrics["ppl_word"] = _exp(self.nll_sum / n_words)
        return metrics


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf
