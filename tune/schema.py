"""What a search needs from the run config, which sits above tune/: `stoker.config` composes the
sections (the `tune` one among them) into `RunConfig`, so tune/ cannot import it back. The
caller that loaded the config passes in how it validates (`RunSchema`); `SearchRun` is the run's
typed shape as the runner reads it.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from stoker.datasets.config import DataConfig
from stoker.trainer.config import ModelConfig, ScalingConfig, TrainConfig
from stoker.tune.config import TuneConfig


class SearchRun(Protocol):
    """A validated run config with a tune section (`stoker.config.RunConfig` is one)."""

    name: str
    storage: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    scaling: ScalingConfig
    tune: TuneConfig | None

    def model_dump(self, **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RunSchema:
    """How a run config is validated: `RunSchema(RunConfig, parse_config)` from stoker.config."""

    model: type[BaseModel]
    """The composed run config model: the fields a dotted `tune.space` path may name."""
    parse: Callable[[Any, str], SearchRun]
    """Validate a run config given as a dict; `UserError` naming the key and the source
    (the second argument) otherwise. Travels to the trials (by reference: importable)."""
