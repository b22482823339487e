"""The training run's type: the contract every layer that takes a run is typed with.

`RunSpec` is one training run (name, storage, data, model, train, scaling): what
`stoker.trainer.run.train` runs, what `stoker.tune` varies and `stoker.cluster` submits and
records. The CLI's `stoker.config.RunConfig` extends it with its own sections (`tune`,
`cluster`) and nothing else, so a `RunConfig` is a `RunSpec` wherever one is taken.

It lives in the trainer package, not in stoker's bottom layer: its sections are the models that
sit next to the code they configure (`stoker.datasets.config`, `stoker.trainer.config`), and
import-linter's layers cannot nest (`trainer.config` cannot be a layer of its own inside
`trainer`). Every layer that takes a run (trainer/, tune/, cluster/, the CLI) is at or above
this one; datasets/ takes its own section only.

`parse_run` validates a dict into a run type once, at the edge (a config file, a run directory's
config record, a job's environment); errors name the key path and the source in one line.
"""

from typing import Any, TypeVar

from pydantic import Field, ValidationError, model_validator

from stoker.datasets.config import DataConfig
from stoker.errors import ConfigKeyError, UserError
from stoker.strict_model import StrictModel
from stoker.trainer.config import ModelConfig, ScalingConfig, TrainConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class RunSpec(StrictModel):
    """One training run: the data, the model, how to train it and on how many workers."""

    name: str = Field(pattern=NAME_PATTERN)
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

    @model_validator(mode="after")
    def _cross_section(self) -> "RunSpec":
        if self.train.deepspeed.fp16 and not self.scaling.use_gpu:
            # DeepSpeed raises deep inside initialize() otherwise ("Type fp16 is not supported
            # on your device"); say it up front and point at the fix.
            raise ConfigKeyError(
                "train.deepspeed.fp16",
                "fp16 needs GPUs (scaling.use_gpu is false); use bf16 on CPU",
            )
        return self


Run = TypeVar("Run", bound=RunSpec)


def parse_run(raw: Any, source: str, model: type[Run] = RunSpec) -> Run:
    """Validate an already-parsed YAML document as `model` (a `RunSpec` or a type extending it);
    `UserError` naming the first bad key and `source` otherwise."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the run config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more)" if more else ""
        raise UserError(f"{_describe(first, model)} ({source}){suffix}") from None


def run_from_record(config: dict[str, Any], source: str) -> RunSpec:
    """The run a config record describes (a run directory's config.yaml, which the CLI writes
    whole): its run sections validated once; the sections a `RunSpec` does not have (the CLI's
    `tune` and `cluster`) are the CLI's to read."""
    return parse_run({key: value for key, value in config.items() if key in RunSpec.model_fields}, source)


def _describe(error: dict[str, Any], model: type[RunSpec]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, ConfigKeyError):
        return f"{cause.key}: {cause}"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    bounds = _bounds(error["loc"], model)
    if bounds and error["type"] in ("greater_than_equal", "less_than_equal"):
        message = f"must be {bounds[0]}..{bounds[1]}"
    elif cause is not None:
        message = str(cause)
    else:
        message = error["msg"][0].lower() + error["msg"][1:]
    if error["type"].startswith("value_error"):
        return f"{key}: {message}"
    return f"{key}: {message}, got {error['input']!r}"


def _bounds(loc: tuple, model: Any) -> tuple[Any, Any] | None:
    """(ge, le) of the field at `loc` when it has both, so a range error can state the range."""
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
