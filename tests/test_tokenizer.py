"""Tokenizers on real text: the PTB word-level vocabulary, word counts, byte-level BPE round trips."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from samba.data.corpus import load_local_corpus
from samba.data.tokenizer import EOS, UNK, encode_rows, train_tokenizer


@pytest.fixture(scope="module")
def ptb(ptb_dir: Path) -> dict[str, list[str]]:
    return load_local_corpus(ptb_dir)


@pytest.fixture(scope="module")
def ptb_word(ptb: dict[str, list[str]]):
    return train_tokenizer(ptb["train"], "word", 10000)


@pytest.fixture(scope="module")
def ptb_bpe(ptb: dict[str, list[str]]):
    return train_tokenizer(ptb["train"][:5000], "bpe", 600)


@pytest.fixture
def wikitext_rows(data_dir: Path) -> list[str]:
    path = data_dir / "wikitext-2" / "valid.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found; set SAMBA_TEST_DATA to the folder with wikitext-2/")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines[:400]]


def _literal_unk_count(rows: list[str]) -> int:
    return sum(row.split().count(UNK) for row in rows)


def test_word_ptb_vocabulary(ptb_word) -> None:
    assert ptb_word.get_vocab_size() == 10000
    assert ptb_word.token_to_id(UNK) == 0
    assert ptb_word.token_to_id(EOS) == 1
    assert sorted(ptb_word.get_vocab().values()) == list(range(10000))


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_word_ptb_unk_only_literal(ptb, ptb_word, split: str) -> None:
    ids, n_words = encode_rows(ptb_word, ptb[split])

    assert int((ids == 0).sum()) == _literal_unk_count(ptb[split])
    assert len(ids) == n_words  # One id per word and one <eos> per row.


def test_word_ptb_word_counts(ptb, ptb_word) -> None:
    valid_ids, valid_words = encode_rows(ptb_word, ptb["valid"])
    _, test_words = encode_rows(ptb_word, ptb["test"])
    _, train_words = encode_rows(ptb_word, ptb["train"])

    assert valid_words == 73760
    assert test_words == 82430
    assert train_words == 929589
    assert valid_ids.dtype == np.int32
    assert valid_ids.ndim == 1
    assert int((valid_ids == 1).sum()) == 3370
    assert valid_ids[-1] == 1


def test_encode_rows_layout(ptb_word) -> None:
    rows = [" the cat \n", "", " <unk> sat \n", ""]
    ids, n_words = encode_rows(ptb_word, rows)

    the, cat, sat = (ptb_word.token_to_id(word) for word in ("the", "cat", "sat"))
    assert ids.tolist() == [the, cat, 1, 0, sat, 1]
    assert n_words == 6


def test_encode_rows_all_blank(ptb_word) -> None:
    ids, n_words = encode_rows(ptb_word, ["", "", ""])

    assert ids.shape == (0,)
    assert n_words == 0


def test_word_keeps_most_frequent(ptb) -> None:
    rows = ptb["train"][:2000]
    tokenizer = train_tokenizer(rows, "word", 50)

    counts = Counter(word for row in rows for word in row.split() if word not in (UNK, EOS))
    expected = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:48]]
    vocab = tokenizer.get_vocab()
    assert sorted(vocab, key=vocab.get) == [UNK, EOS, *expected]
    ids, _ = encode_rows(tokenizer, [" the zzzunseen \n"])
    assert ids.tolist() == [vocab["the"], 0, 1]


def test_word_vocab_too_large_names_available(ptb) -> None:
    with pytest.raises(ValueError, match=r"at most 10000"):
        train_tokenizer(ptb["train"], "word", 10001)


def test_vocab_too_small_raises() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        train_tokenizer([" a b \n"], "word", 2)
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer([" a b \n"], "bpe", 257)


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="'word' or 'bpe'"):
        train_tokenizer([" a b \n"], "char", 10)  # type: ignore[arg-type]


def test_training_is_deterministic(ptb) -> None:
    rows = ptb["train"][:3000]
    for kind, size in (("word", 500), ("bpe", 400)):
        first = train_tokenizer(rows, kind, size).to_str()
        second = train_tokenizer(rows, kind, size).to_str()
        assert first == second, kind


def test_bpe_vocabulary_and_specials(ptb_bpe) -> None:
    assert ptb_bpe.get_vocab_size() == 600
    assert ptb_bpe.token_to_id(UNK) == 0
    assert ptb_bpe.token_to_id(EOS) == 1


def test_bpe_round_trip_unseen_text(ptb_bpe, wikitext_rows: list[str]) -> None:
    # WikiText has characters PTB lacks (capitals, digits, dashes), and byte-level BPE still
    # encodes and decodes them exactly. The prefix space goes before the first ordinary
    # word, so a row that opens with "<unk>" decodes without it.
    texts = [row.strip() for row in wikitext_rows if row.strip()]
    assert any(text.startswith(UNK) for text in texts)
    for text in texts:
        encoding = ptb_bpe.encode(text)
        expected = text if text.startswith(UNK) else " " + text
        assert ptb_bpe.decode(encoding.ids, skip_special_tokens=False) == expected


def test_bpe_unk_only_literal(ptb_bpe, wikitext_rows: list[str]) -> None:
    ids, n_words = encode_rows(ptb_bpe, wikitext_rows)
    word_level = train_tokenizer(wikitext_rows, "word", 100)
    word_ids, word_n_words = encode_rows(word_level, wikitext_rows)

    assert int((ids == 0).sum()) == _literal_unk_count(wikitext_rows)
    assert n_words == word_n_words == len(word_ids)
    assert len(ids) > n_words
    assert int((ids == 1).sum()) == sum(1 for row in wikitext_rows if row)


def test_bpe_segments_literal_unk(ptb_bpe) -> None:
    encoding = ptb_bpe.encode("pierre <unk> N years")

    assert encoding.ids.count(0) == 1
    assert ptb_bpe.decode(encoding.ids, skip_special_tokens=False) == " pierre <unk> N years"
    assert "unk" not in ptb_bpe.get_vocab()
