"""Text generation with a trained model: prefill the prompt, then sample one token per step.

Both the baseline and Samba sample from the LM head's logits, so each decode step runs a
Samba model's backbone alone, without the readout. The recurrent step makes each new
token cost the same, whatever the length of the text so far.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from samba.sparsity.sparse_linear import sparse_input_linears


def check_sampling(n_tokens: int, temperature: float, top_k: int) -> None:
    """Raise ValueError for sampling settings that cannot work."""
    if n_tokens < 1:
        raise ValueError(f"the number of tokens to generate must be at least 1, got {n_tokens}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps the whole vocabulary), got {top_k}")


def sample_next(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator) -> Tensor:
    """Draw one token id per row of logits (batch, vocab_size). Returns (batch,) int64.

    The logits are divided by temperature; with top_k > 0 only the top_k largest logits
    keep a nonzero probability.
    """
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth_largest = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_largest, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], n_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, sparse_site: str | None = None) -> list[int]:
    """Continue prompt_ids by n_tokens sampled tokens and return the new ids only.

    `model` is a MambaLM or SambaLM. The prompt runs as one forward pass that fills the
    inference cache, and every new token is one recurrent step. The same model, prompt
    and seed give the same tokens.

    With sparse_site (block_output or inner), the decode steps run the linear layers that
    read that site's tensor through SparseInputLinear (see sparse_input_linears), which
    multiplies only the weight rows of nonzero inputs. It pays only when the model's
    sparsifiers put zeros at that site. The logits then differ from dense decoding by float
    rounding only, so the tokens are the same unless a sample falls within that rounding
    of a boundary between two tokens.
    """
    check_sampling(n_tokens, temperature, top_k)
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token id")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    # SambaLM.step would also compute the readout logits, which sampling never reads.
    decoder = getattr(model, "backbone", model)

    cache = model.new_cache()
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits = model(prompt, cache=cache).logits[:, -1]
    new_ids: list[int] = []
    with sparse_input_linears(model, sparse_site) if sparse_site is not None else nullcontext():
        for index in range(n_tokens):
            token = sample_next(logits, temperature, top_k, generator)
            new_ids.append(int(token.item()))
            if index + 1 < n_tokens:
                logits = decoder.step(token, cache).logits
    return new_ids
