"""Perplexity and accuracy accumulation against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from samba.metrics.perplexity import NextTokenAccumulator


def test_uniform_logits_perplexity_is_vocab_size() -> None:
    vocab = 37
    targets = torch.tensor([[0, 5, 0, 36, 2], [0, 1, 9, 9, 20]])
    accumulator = NextTokenAccumulator()
    accumulator.update(torch.zeros(2, 5, vocab, dtype=torch.float64), targets)

    result = accumulator.result(n_words=4)
    assert result["n_tokens"] == 10
    assert result["nll_per_token"] == pytest.approx(math.log(vocab), rel=1e-14)
    assert result["ppl_token"] == pytest.approx(vocab, rel=1e-13)
    # Total NLL 10 log 37 over 4 words.
    assert result["ppl_word"] == pytest.approx(vocab ** (10 / 4), rel=1e-13)
    # argmax of equal logits is id 0, and 3 of the 10 targets are 0.
    assert result["accuracy"] == 0.3


def test_uniform_float32_logits() -> None:
    accumulator = NextTokenAccumulator()
    accumulator.update(torch.zeros(3, 8, 10000), torch.randint(0, 10000, (3, 8)))

    assert accumulator.result()["ppl_token"] == pytest.approx(10000, rel=1e-5)


def test_two_class_closed_form() -> None:
    # p = [1/4, 3/4] at every position. Targets 1, 1, 0: NLL = 2 log(4/3) + log 4.
    logits = torch.log(torch.tensor([1.0, 3.0], dtype=torch.float64)).expand(1, 3, 2)
    accumulator = NextTokenAccumulator()
    accumulator.update(logits, torch.tensor([[1, 1, 0]]))

    result = accumulator.result()
    expected_nll = (2 * math.log(4 / 3) + math.log(4)) / 3
    assert result["nll_per_token"] == pytest.approx(expected_nll, rel=1e-14)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert "ppl_word" not in result


def test_batches_accumulate_like_one() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, 13, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 13, (6, 9), generator=generator)
    whole, parts = NextTokenAccumulator(), NextTokenAccumulator()
    whole.update(logits, targets)
    for start, stop in ((0, 1), (1, 4), (4, 6)):
        parts.update(logits[start:stop], targets[start:stop])
    parts.update(logits[:, :0], targets[:, :0])  # An empty batch adds nothing.

    expected, measured = whole.result(n_words=40), parts.result(n_words=40)
    assert measured["n_tokens"] == expected["n_tokens"] == 54
    assert measured["nll_per_token"] == pytest.approx(expected["nll_per_token"], rel=1e-14)
    assert measured["ppl_word"] == pytest.approx(expected["ppl_word"], rel=1e-13)
    assert measured["accuracy"] == expected["accuracy"]


def test_accuracy_counts_argmax_hits() -> None:
    logits = torch.full((1, 4, 5), -1.0)
    logits[0, torch.arange(4), torch.tensor([2, 3, 4, 0])] = 1.0
    accumulator = NextTokenAccumulator()
    accumulator.update(logits, torch.tensor([[2, 3, 1, 1]]))

    assert accumulator.result()["accuracy"] == 0.5


def test_huge_perplexity_is_infinite() -> None:
    logits = torch.zeros(1, 1, 2, dtype=torch.float64)
    logits[0, 0, 0] = 2000.0
    accumulator = NextTokenAccumulator()
    accumulator.update(logits, torch.tensor([[1]]))

    assert accumulator.result()["ppl_token"] == math.inf


def test_rejects_bad_input() -> None:
    accumulator = NextTokenAccumulator()
    with pytest.raises(ValueError, match="no predictions"):
        accumulator.result()
    with pytest.raises(ValueError, match=r"\(batch, length, vocab\)"):
        accumulator.update(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    accumulator.update(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="n_words"):
        accumulator.result(n_words=0)
