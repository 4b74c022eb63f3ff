"""The typed params schema (params.yaml) and its loader.

Values load in one order: the schema's defaults, then params.yaml. DVC experiments
override params.yaml itself (`dvc exp run -S loss.pruning_weight=0.01`), so the file
is the single source of truth for every stage.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from samba.model.config import MambaConfig, ReadoutConfig
from samba.sparsity.config import SparsityConfig


class ParamsError(ValueError):
    """A params.yaml problem a user can fix; the message names the key and what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: Literal["hub", "local", "synthetic"] = "hub"
    local_dir: str | None = None
    hub_name: str = "Salesforce/wikitext"
    hub_config: str = "wikitext-2-raw-v1"
    max_rows: int = Field(0, ge=0)
    synthetic_seed: int = 0
    synthetic_sentences: int = Field(20000, gt=0)

    @model_validator(mode="after")
    def _local_needs_folder(self) -> DataParams:
        if self.source == "local" and not self.local_dir:
            raise ValueError(
                "source is 'local' but local_dir is not set: set data.local_dir to a folder "
                "with train.txt, valid.txt and test.txt"
            )
        return self


class TokenizerParams(Section):
    kind: Literal["word", "bpe"] = "word"
    vocab_size: int = Field(10000, gt=2)


class ModelParams(Section):
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    d_state: int = Field(16, gt=0)
    d_conv: int = Field(4, gt=0)
    expand: int = Field(2, gt=0)
    dt_rank: int | None = Field(None, gt=0)
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _dt_range(self) -> ModelParams:
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        return self

    def mamba_config(self, vocab_size: int) -> MambaConfig:
        return MambaConfig(vocab_size=vocab_size, **self.model_dump())


class ReadoutParams(Section):
    hidden_size: int = Field(256, gt=0)

    def readout_config(self) -> ReadoutConfig:
        return ReadoutConfig(hidden_size=self.hidden_size)


class LossParams(Section):
    readout_weight: float = Field(0.5, ge=0, allow_inf_nan=False)
    pruning_weight: float = Field(0.1, ge=0, allow_inf_nan=False)


class SparsityParams(Section):
    penalty: Literal["l1", "l1_rms"] = "l1"
    method: Literal["none", "topk", "magnitude"] = "none"
    site: Literal["ssm_state", "block_output", "inner"] = "ssm_state"
    target: float = Field(0.9, ge=0, lt=1)
    calibration_tokens: int = Field(1024, gt=0)
    sweep: list[Annotated[float, Field(ge=0, lt=1)]] = [0.5, 0.75, 0.9, 0.95]

    def sparsity_config(self) -> SparsityConfig:
        return SparsityConfig(**self.model_dump())


class TrainParams(Section):
    seed: int = 0
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)
    min_lr: float = Field(1e-4, ge=0, allow_inf_nan=False)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0, allow_inf_nan=False)
    grad_clip: float = Field(1.0, gt=0, allow_inf_nan=False)
    log_every: int = Field(25, gt=0)
    checkpoint_every: int = Field(100, ge=0)
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="after")
    def _lr_order(self) -> TrainParams:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class EvalParams(Section):
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(128, gt=0)
    relative_threshold: float = Field(0.01, gt=0, allow_inf_nan=False)
    absolute_threshold: float = Field(1e-3, gt=0, allow_inf_nan=False)
    max_tokens: int = Field(0, ge=0)


class TrackingParams(Section):
    enabled: bool = True
    experiment: str = Field("samba", min_length=1)


class ReportParams(Section):
    experiments: bool = False


class Params(Section):
    data: DataParams = DataParams()
    tokenizer: TokenizerParams = TokenizerParams()
    model: ModelParams = ModelParams()
    readout: ReadoutParams = ReadoutParams()
    loss: LossParams = LossParams()
    sparsity: SparsityParams = SparsityParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    tracking: TrackingParams = TrackingParams()
    report: ReportParams = ReportParams()

    def flat(self) -> dict[str, Any]:
        """Return every param as a dotted key, e.g. {"loss.pruning_weight": 0.1}."""
        return flatten(self.model_dump())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def read_yaml(path: Path) -> Any:
    """Read YAML 1.2, so `1e-07` (as `dvc exp run -S` writes it) loads as a float."""
    yaml = YAML(typ="safe", pure=True)
    yaml.version = (1, 2)
    return yaml.load(path.read_text(encoding="utf-8"))


def _suggest(location: tuple) -> str:
    """Name the closest valid key, so a typo's fix is on the same line."""
    model: type[BaseModel] = Params
    for part in location[:-1]:
        annotation = model.model_fields.get(str(part))
        if annotation is None or not isinstance(annotation.annotation, type):
            break
        model = annotation.annotation
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(str(location[-1]), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid keys here are {', '.join(valid)}"


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key!r}: {_suggest(error['loc'])}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"invalid value {error.get('input')!r} for {key}: allowed values are {expected}"
    # pydantic words bounds as "Input should be less than 1"; name the key's value instead.
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "it must be", 1)
    if not key:
        return message
    if kind == "value_error":
        return f"{key}: {message}"
    return f"invalid value {error.get('input')!r} for {key}: {message}"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate params.yaml; raise ParamsError with one line per problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the repository root or pass --params)")
    try:
        raw = read_yaml(path)
    except YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start}): save it as UTF-8 YAML") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections (data, model, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(_describe(item) for item in error.errors())
        raise ParamsError(f"{path}: {problems}") from None
