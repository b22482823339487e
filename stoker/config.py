"""The run config: one YAML file composed of the sections that live next to their code.

`load_config` is the only way the CLI reads a config, so every error names the key path and
the file: `train.deepspeed.zero_stage: must be 0..3, got 5 (run.yaml)`.
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from stoker.cluster.config import ClusterConfig
from stoker.datasets.config import DataConfig
from stoker.errors import ConfigKeyError, UserError
from stoker.schema import StrictModel
from stoker.trainer.config import ModelConfig, ScalingConfig, TrainConfig
from stoker.tune.config import TuneConfig


class RunConfig(StrictModel):
    """One training run: the data, the model, how to train it and on how many workers."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    """Run name; the run directory is `<storage>/<name>`, and starting a run with the same
    name again resumes it."""
    storage: str = "runs"
    """Directory (or shared filesystem path, or `s3://bucket/prefix`) that holds run directories.
    On S3, Ray Train keeps the checkpoints there and the run's records are staged locally and
    uploaded (stoker.trainer.run_dir); `stoker tune` needs a directory."""
    data: DataConfig
    """Raw data, cleaning, encoding and splits."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The network."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Epochs, batch size, optimizer and the DeepSpeed engine."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """Workers and their resources."""
    tune: TuneConfig | None = None
    """A hyperparameter search over this run (`stoker tune`); ignored by `stoker train`."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Remote cluster submission, the runs registry and monitoring (stoker.cluster.config)."""

    @model_validator(mode="after")
    def _cross_section(self) -> "RunConfig":
        if self.train.deepspeed.fp16 and not self.scaling.use_gpu:
            # DeepSpeed raises deep inside initialize() otherwise ("Type fp16 is not supported
            # on your device"); say it up front and point at the fix.
            raise ConfigKeyError(
                "train.deepspeed.fp16",
                "fp16 needs GPUs (scaling.use_gpu is false); use bf16 on CPU",
            )
        return self


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, ConfigKeyError):
        return f"{cause.key}: {cause}"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    bounds = _bounds(error["loc"])
    if bounds and error["type"] in ("greater_than_equal", "less_than_equal"):
        message = f"must be {bounds[0]}..{bounds[1]}"
    elif cause is not None:
        message = str(cause)
    else:
        message = error["msg"][0].lower() + error["msg"][1:]
    if error["type"].startswith("value_error"):
        return f"{key}: {message}"
    return f"{key}: {message}, got {error['input']!r}"


def _bounds(loc: tuple) -> tuple[Any, Any] | None:
    """(ge, le) of the field at `loc` when it has both, so a range error can state the range."""
    model: Any = RunConfig
    field = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        model = field.annotation
    if field is None:
        return None
    ge = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
    le = next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)
    return (ge, le) if ge is not None and le is not None else None


def parse_config(raw: Any, source: str) -> RunConfig:
    """Validate an already-parsed YAML document; `source` names it in errors."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the run config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more)" if more else ""
        raise UserError(f"{_describe(first)} ({source}){suffix}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config file, raising `UserError` naming the key and the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
    return parse_config(raw, path.name)


def json_schema() -> dict[str, Any]:
    """The JSON schema of the run config, for editors and `stoker config schema`."""
    return RunConfig.model_json_schema()
