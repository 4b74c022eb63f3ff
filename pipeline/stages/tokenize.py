"""Stage `tokenize`: load the corpus, train the tokenizer on train, save token ids."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import StageError
from pipeline.params import Params
from pipeline.workspace import check_tracked_inputs, workspace_root
from samba.data.corpus import SPLITS, HubUnreachableError, load_hub_corpus, load_local_corpus, make_synthetic_corpus
from samba.data.tokenizer import EOS, encode_rows, train_tokenizer

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENS_FILE = "tokens.safetensors"
META_FILE = "meta.json"


def resolve_local_dir(local_dir: str) -> Path:
    """Resolve a relative data.local_dir against the workspace root, not the working directory.

    For a queued or `--temp` experiment that is the temporary workspace, which holds the version
    of the data that the experiment's commit tracks.
    """
    path = Path(local_dir).expanduser()
    return path if path.is_absolute() else workspace_root() / path


def load_corpus(params: Params) -> tuple[dict[str, list[str]], str]:
    data = params.data
    if data.source == "synthetic":
        sentences = data.synthetic_sentences
        corpus = make_synthetic_corpus(data.synthetic_seed, n_train=sentences,
                                       n_valid=max(sentences // 10, 1), n_test=max(sentences // 10, 1))
        return corpus, f"synthetic corpus (seed {data.synthetic_seed}, {sentences} train sentences)"
    if data.source == "local":
        folder = resolve_local_dir(data.local_dir)
        check_tracked_inputs([folder / f"{split}.txt" for split in SPLITS], "data.local_dir")
        if not folder.exists():
            # Name the value as params.yaml sets it: in a --temp run the resolved path is a temporary copy.
            raise StageError(f"data.local_dir {data.local_dir!r}: corpus folder not found ({folder}); "
                             "create it with train.txt, valid.txt and test.txt, or fix the path")
        return load_local_corpus(folder), f"local folder {data.local_dir}"
    try:
        return load_hub_corpus(data.hub_name, data.hub_config), f"Hugging Face Hub {data.hub_name}/{data.hub_config}"
    except HubUnreachableError as error:
        raise StageError(
            f"{error}; to run offline, set data.source to local and data.local_dir to a folder "
            "with train.txt, valid.txt and test.txt"
        ) from None


def run_tokenize(params: Params, out_dir: Path) -> dict:
    """Tokenize the corpus that `params.data` names and write ids, tokenizer and meta to out_dir."""
    corpus, description = load_corpus(params)
    if params.data.max_rows:
        corpus = {split: rows[: params.data.max_rows] for split, rows in corpus.items()}
    logger.info("corpus: %s (%s rows)", description, ", ".join(f"{s} {len(corpus[s])}" for s in SPLITS))
    try:
        tokenizer = train_tokenizer(corpus["train"], params.tokenizer.kind, params.tokenizer.vocab_size)
    except ValueError as error:
        raise StageError(f"tokenizer.vocab_size={params.tokenizer.vocab_size}: {error}") from None

    arrays, counts = {}, {}
    for split in SPLITS:
        ids, n_words = encode_rows(tokenizer, corpus[split])
        if len(ids) < 2:
            raise StageError(f"the {split} split of the {description} has no text after tokenization")
        arrays[split] = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int32))
        counts[split] = {"n_tokens": int(len(ids)), "n_words": int(n_words)}

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    save_file(arrays, str(out_dir / TOKENS_FILE))
    meta = {
        "source": params.data.source,
        "description": description,
        "tokenizer": params.tokenizer.kind,
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_id": tokenizer.token_to_id(EOS),
        "tokenizer_sha256": hashlib.sha256((out_dir / TOKENIZER_FILE).read_bytes()).hexdigest(),
        "splits": counts,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("vocabulary %d; tokens %s", meta["vocab_size"],
                ", ".join(f"{s} {counts[s]['n_tokens']}" for s in SPLITS))
    return meta


def load_tokens(tokens_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load the ids (as int64) and meta.json that `run_tokenize` wrote."""
    meta_path, tokens_path = tokens_dir / META_FILE, tokens_dir / TOKENS_FILE
    for path in (meta_path, tokens_path):
        if not path.is_file():
            raise StageError(f"tokenized data not found: {path} (run `dvc repro tokenize` or `samba tokenize` first)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arrays = load_file(str(tokens_path))
        ids = {split: arrays[split].long() for split in SPLITS}
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, KeyError, OSError) as error:
        raise StageError(f"tokenized data in {tokens_dir} is corrupted ({error}): rerun `samba tokenize`") from None
    return ids, meta
