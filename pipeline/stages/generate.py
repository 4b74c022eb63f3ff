"""Command `samba generate`: sample text from a trained checkpoint with its tokenizer."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tokenizers import Tokenizer
from torch import nn

from pipeline.errors import StageError
from pipeline.params import load_params
from pipeline.stages.tokenize import TOKENIZER_FILE, load_tokens
from samba.data.tokenizer import EOS
from samba.evaluate import calibrate_magnitude
from samba.generate import check_sampling, generate
from samba.sparsity import SparsityConfig, install_config, site_input_linears
from samba.sparsity.sparse_linear import DEFAULT_MAX_DENSITY
from samba.train.checkpoint import CONFIG_FILE, load_checkpoint

logger = logging.getLogger(__name__)

# Sites whose zeros feed linear layers that decode runs. ssm_state feeds only the readout, which decode skips.
SPARSE_DECODE_SITES = ("block_output", "inner")


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


def checkpoint_sparsity(checkpoint_dir: Path, config: dict) -> SparsityConfig | None:
    """Return the sparsity config a Samba checkpoint was trained with, or None for a baseline."""
    values = config.get("sparsity")
    if not values:
        return None
    try:
        return SparsityConfig(**values)
    except (TypeError, ValueError) as error:
        raise StageError(f"the sparsity config in {checkpoint_dir / CONFIG_FILE} is invalid ({error}): "
                         "retrain the model") from None


def enforce_zeros(model: nn.Module, kind: str, sparsity: SparsityConfig, tokens_dir: Path, params_path: Path) -> None:
    """Install the checkpoint's topk or magnitude zeros, as the evaluate stage does, so generation runs that model.

    magnitude thresholds are calibrated on the first sparsity.calibration_tokens tokens
    of the validation split, in windows of eval.seq_len tokens read from `params_path`.
    """
    thresholds = None
    if sparsity.method == "magnitude":
        params = load_params(params_path)
        ids, meta = load_tokens(tokens_dir)
        try:
            thresholds = calibrate_magnitude(
                model, ids["valid"], kind=kind, site=sparsity.site, target=sparsity.target,
                tokens=sparsity.calibration_tokens, seq_len=params.eval.seq_len,
                batch_size=params.eval.batch_size, eos_id=meta["eos_id"])
        except ValueError as error:
            raise StageError(f"magnitude thresholds cannot be calibrated ({error}): lower eval.seq_len "
                             f"in {params_path}") from None
    install_config(model, sparsity, thresholds)


def sparse_decode_site(model: nn.Module, sparsity: SparsityConfig | None, dense: bool) -> str | None:
    """Choose the site whose readers decode through the sparse-input path, and log which matmuls run sparse.

    The sparse path is chosen when topk or magnitude puts zeros at block_output or inner,
    the model is on the CPU and `dense` is False.
    """
    enforced = sparsity is not None and sparsity.method in ("topk", "magnitude")
    device = next(model.parameters()).device
    if not enforced or sparsity.site not in SPARSE_DECODE_SITES:
        reason = "the checkpoint enforces no zeros at block_output or inner"
    elif dense:
        reason = "--dense was given"
    elif device.type != "cpu":
        reason = f"the sparse-input path is for CPU decode and the model is on {device}"
    else:
        names = [name for name, _, _ in site_input_linears(model, sparsity.site)]
        logger.info("sparse-input matmuls (%s zeros at %s): %s. Each call runs dense when more than %.0f%% "
                    "of its inputs are nonzero.", sparsity.method, sparsity.site, ", ".join(names),
                    100 * DEFAULT_MAX_DENSITY)
        return sparsity.site
    logger.info("all matmuls run dense: %s", reason)
    return None


def run_generate(checkpoint_dir: Path, tokens_dir: Path, prompt: str, n_tokens: int, temperature: float,
                 top_k: int, seed: int, *, dense: bool = False, params_path: Path = Path("params.yaml")) -> str:
    """Continue `prompt` by n_tokens tokens sampled from the checkpoint and return the text.

    The text is the prompt as the tokenizer encodes it (unknown words become <unk>) followed
    by the sampled tokens. An empty prompt starts a new sentence. A checkpoint trained with
    topk or magnitude generates with those zeros applied. With zeros at block_output or
    inner, decoding multiplies only the nonzero inputs of the layers that read them, unless
    `dense` is set. Both paths give the same logits up to float rounding, so the same seed
    gives the same text unless a sample falls within that rounding of a token boundary.
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
    sparsity = checkpoint_sparsity(checkpoint_dir, config)
    if sparsity is not None and sparsity.method in ("topk", "magnitude"):
        enforce_zeros(model, config["kind"], sparsity, tokens_dir, params_path)
    sparse_site = sparse_decode_site(model, sparsity, dense)

    prompt_ids = tokenizer.encode(prompt.strip(), add_special_tokens=False).ids if prompt.strip() else []
    logger.info("generating %d tokens from %s (%s model) after a %d-token prompt", n_tokens, checkpoint_dir,
                config["kind"], len(prompt_ids))
    new_ids = generate(model, prompt_ids or [eos_id], n_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       sparse_site=sparse_site)
    return decode(tokenizer, prompt_ids + new_ids, eos_id)
