"""The run a search takes: `SearchRun`, the run's type (`stoker.trainer.run_spec.RunSpec`) with
the `tune` section.

The CLI's `stoker.config.RunConfig`, above tune/, extends it with its `cluster` section, which a
search carries into every trial's config. So a trial's config is validated as the searched run's
own type (`type(run)`, with `stoker.trainer.run_spec.parse_run`), and tune/ never imports
stoker.config.
"""

from stoker.trainer.run_spec import RunSpec
from stoker.tune.config import TuneConfig


class SearchRun(RunSpec):
    """A run and the search over it: the run's type (stoker.trainer.run_spec) with a `tune`
    section. The CLI's `stoker.config.RunConfig` extends it with its `cluster` section."""

    tune: TuneConfig | None = None
    """A hyperparameter search over this run (`stoker tune`); ignored by `stoker train`."""
