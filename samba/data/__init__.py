"""Corpus loading (Hugging Face `datasets`), tokenizers (`tokenizers`) and token streams."""

from samba.data.corpus import (
    SPLITS,
    CorpusError,
    HubUnreachableError,
    load_hub_corpus,
    load_local_corpus,
    make_synthetic_corpus,
    to_hub_row,
)
from samba.data.stream import TrainStream, eval_windows
from samba.data.tokenizer import EOS, SPECIAL_TOKENS, UNK, encode_rows, train_tokenizer

__all__ = [
    "EOS",
    "SPECIAL_TOKENS",
    "SPLITS",
    "UNK",
    "CorpusError",
    "HubUnreachableError",
    "TrainStream",
    "encode_rows",
    "eval_windows",
    "load_hub_corpus",
    "load_local_corpus",
    "make_synthetic_corpus",
    "to_hub_row",
    "train_tokenizer",
]
