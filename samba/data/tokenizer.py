"""Word-level and byte-level BPE tokenizers (Hugging Face `tokenizers`) and row encoding.

Rows come in the Hub form of `samba.data.corpus`. A row's text is the row without its
surrounding whitespace, and a blank row has no text. `encode_rows` ends each text with the
end-of-sentence token, so the row boundary is one id and not trailing whitespace.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<eos>"
UNK = "<unk>"
SPECIAL_TOKENS = (UNK, EOS)  # Ids 0 and 1 in both kinds of tokenizer.

# A byte-level BPE starts from one token per byte value, so it needs these many ids before any merge.
_BYTE_ALPHABET_SIZE = len(pre_tokenizers.ByteLevel.alphabet())
_SPECIAL_PATTERN = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
_ENCODE_BATCH_ROWS = 4096


def train_tokenizer(rows: list[str], kind: Literal["word", "bpe"], vocab_size: int) -> Tokenizer:
    """Train a tokenizer of `vocab_size` ids on `rows`, the train split only.

    word: one id per whitespace-separated word, keeping the `vocab_size - 2` most frequent
    words (ties broken by the word's spelling) after <unk> = 0 and <eos> = 1. Other words
    map to <unk>, and so does the literal word "<unk>" that PTB and WikiText already contain.

    bpe: byte-level BPE as in GPT-2: text is split into words with their leading space and
    then into bytes, so any text encodes without <unk> and decodes back exactly. The 256
    byte tokens and the two special tokens come first, so `vocab_size` must be at least 258.
    The literal strings "<unk>" and "<eos>" in text encode as the special ids.

    Raises ValueError when `vocab_size` is too small for the special tokens (and byte
    alphabet), or for word-level when the rows have fewer distinct words than it needs.
    """
    if kind == "word":
        return _train_word_level(rows, vocab_size)
    if kind == "bpe":
        return _train_bpe(rows, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}: use 'word' or 'bpe'")


def encode_rows(tokenizer: Tokenizer, rows: list[str]) -> tuple[np.ndarray, int]:
    """Encode the non-blank rows, each followed by the <eos> id, and count their words.

    Returns the ids (int32, 1-D) and n_words: the whitespace-separated words of the
    non-blank rows plus one end-of-sentence per row, as PTB counts them. Dividing a
    total NLL by n_words gives a per-word perplexity that compares across tokenizers.
    Blank rows add nothing to either.
    """
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise ValueError(f"the tokenizer has no {EOS} token: train it with train_tokenizer")
    texts = [row.strip() for row in rows if row.strip()]
    n_words = sum(len(text.split()) for text in texts) + len(texts)

    encoded: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_BATCH_ROWS):
        batch = texts[start:start + _ENCODE_BATCH_ROWS]
        # encode_batch_fast skips the character offsets, which are not needed here.
        encoded += [encoding.ids for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False)]
    n_ids = sum(len(ids) for ids in encoded) + len(encoded)
    ids = np.fromiter(itertools.chain.from_iterable(ids + [eos_id] for ids in encoded), dtype=np.int32, count=n_ids)
    return ids, n_words


def _train_word_level(rows: list[str], vocab_size: int) -> Tokenizer:
    minimum = len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small for a word-level tokenizer: "
                         f"use at least {minimum} (<unk>, <eos> and one word)")
    # The vocabulary is counted here, not by tokenizers' WordLevelTrainer, because that
    # trainer (tokenizers 0.23) adds a word spelled like a special token a second time.
    # PTB's literal "<unk>" then takes a new id and leaves id 0 unused.
    counts = Counter(word for row in rows for word in row.split())
    for token in SPECIAL_TOKENS:
        counts.pop(token, None)
    available = len(counts) + len(SPECIAL_TOKENS)
    if vocab_size > available:
        raise ValueError(f"vocab_size {vocab_size} is larger than the word-level vocabulary of the train split: "
                         f"it has {available} types ({len(counts)} distinct words, <unk> and <eos>), "
                         f"so set vocab_size to at most {available}")

    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    words = [word for word, _ in ranked[:vocab_size - len(SPECIAL_TOKENS)]]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # The special tokens stay plain vocabulary entries (no added tokens), so each
    # whitespace-separated word, "<unk>" included, becomes exactly one id.
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def _train_bpe(rows: list[str], vocab_size: int) -> Tokenizer:
    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer: "
                         f"use at least {minimum} (256 byte tokens, <unk> and <eos>)")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space gives a row's first word the same leading-space token as every other word.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(token, special=True) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_bpe_training_segments(rows), trainer=trainer)
    return tokenizer


def _bpe_training_segments(rows: list[str]) -> Iterator[str]:
    """Yield the text between special tokens, as `encode` will see it.

    At encoding time, "<unk>" and "<eos>" in the text are matched first and the text
    between them is pre-tokenized on its own. Training on the same pieces keeps merges
    such as "unk" out of the vocabulary.
    """
    for row in rows:
        text = row.strip()
        if text:
            yield from (segment for segment in _SPECIAL_PATTERN.split(text) if segment)
