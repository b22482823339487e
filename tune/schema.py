"""The run a search takes, and how a trial's run config is validated.

`SearchRun` is the run's type (`stoker.trainer.run_spec.RunSpec`) with the `tune` section. The
CLI's `stoker.config.RunConfig`, above tune/, adds its `cluster` section, which a search carries
into every trial's config; so the caller that loaded the config passes in how a whole config is
validated (`RunSchema`), and tune/ never imports stoker.config.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from stoker.trainer.run_spec import RunSpec
from stoker.tune.config import TuneConfig


class SearchRun(RunSpec):
    """A run and the search over it: the run's type (stoker.trainer.run_spec) with a `tune`
    section. The CLI's `stoker.config.RunConfig` extends it with its `cluster` section."""

    tune: TuneConfig | None = None
    """A hyperparameter search over this run (`stoker tune`); ignored by `stoker train`."""


@dataclass(frozen=True)
class RunSchema:
    """How a run config is validated: `RunSchema(RunConfig, parse_config)` from stoker.config."""

    model: type[BaseModel]
    """The composed run config model: the fields a dotted `tune.space` path may name."""
    parse: Callable[[Any, str], SearchRun]
    """Validate a run config given as a dict; `UserError` naming the key and the source
    (the second argument) otherwise. Travels to the trials (by reference: importable)."""
