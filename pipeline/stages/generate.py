"""Command `samba generate`: sample text from a trained checkpoint with its tokenizer."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tokenizers import Tokenizer

from pipeline.errors import StageError
from pipeline.stages.tokenize import TOKENIZER_FILE
from samba.data.tokenizer import EOS
from samba.generate import check_sampling, generate
from samba.train.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


def load_tokenizer(tokens_dir: Path) -> tuple[Tokenizer, str]:
    """Load tokenizer.json from the tokenize stage's folder. Returns it and its SHA-256."""
    path = tokens_dir / TOKENIZER_FILE
    if not path.is_file():
        raise StageError(f"tokenizer not found: {path} (pass the --tokens folder the model was trained on, "
                         "or run `samba tokenize` first)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        raise StageError(f"tokenizer {path} cannot be read ({error}): rerun `samba tokenize`") from None
    return tokenizer, hashlib.sha256(path.read_bytes()).hexdigest()


def decode(tokenizer: Tokenizer, ids: list[int], eos_id: int) -> str:
    """Decode ids to text, one line per sentence: each <eos> id becomes a line break."""
    lines, current = [], []
    for token_id in ids:
        if token_id == eos_id:
            lines.append(current)
            current = []
        else:
            current.append(token_id)
    lines.append(current)
    return "\n".join(tokenizer.decode(line, skip_special_tokens=False).strip() for line in lines)


def run_generate(checkpoint_dir: Path, tokens_dir: Path, prompt: str, n_tokens: int, temperature: float,
                 top_k: int, seed: int) -> str:
    """Continue `prompt` by n_tokens tokens sampled from the checkpoint and return the text.

    The text is the prompt as the tokenizer encodes it (unknown words become <unk>) followed
    by the sampled tokens. An empty prompt starts a new sentence.
    """
    try:
        check_sampling(n_tokens, temperature, top_k)
    except ValueError as error:
        raise StageError(str(error)) from None
    tokenizer, tokenizer_sha256 = load_tokenizer(tokens_dir)
    model, config = load_checkpoint(checkpoint_dir)
    if config.get("tokenizer_sha256") != tokenizer_sha256:
        raise StageError(f"{checkpoint_dir} was trained with another tokenizer than {tokens_dir / TOKENIZER_FILE}: "
                         "pass the --tokens folder of the run that trained it")
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise StageError(f"{tokens_dir / TOKENIZER_FILE} has no {EOS} token: rerun `samba tokenize`")

    prompt_ids = tokenizer.encode(prompt.strip(), add_special_tokens=False).ids if prompt.strip() else []
    logger.info("generating %d tokens from %s (%s model) after a %d-token prompt", n_tokens, checkpoint_dir,
                config["kind"], len(prompt_ids))
    new_ids = generate(model, prompt_ids or [eos_id], n_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return decode(tokenizer, prompt_ids + new_ids, eos_id)
