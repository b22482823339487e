"""The `tune` section of the run config: what to search, how, and for how long.

```yaml
tune:
  metric: val_accuracy            # any key the trainer reports: val_<metric>, best_val_<metric>, train_loss
  num_samples: 20
  searcher: tpe                   # random | grid | tpe | bayesopt | bohb (with scheduler hyperband)
  scheduler: {name: asha, grace_period: 1}
  space:
    train.optimizer.lr: {dist: loguniform, low: 1.0e-4, high: 0.1}
    model.hidden: {dist: choice, values: [[64], [128, 64]]}
  points_to_evaluate: [{train.optimizer.lr: 0.003}]
```
"""

import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from stoker.errors import ConfigKeyError
from stoker.strict_model import StrictModel


class _Range(StrictModel):
    low: float
    """Lower bound (inclusive)."""
    high: float
    """Upper bound (inclusive for `int`)."""

    @model_validator(mode="after")
    def _ordered(self) -> "_Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is greater than high {self.high:g}")
        return self


class Uniform(_Range):
    """A float drawn uniformly from [low, high]."""

    dist: Literal["uniform"]
    """Distribution name."""


class LogUniform(_Range):
    """A float whose logarithm is uniform in [log low, log high]: learning rates, decays."""

    dist: Literal["loguniform"]
    """Distribution name."""

    @model_validator(mode="after")
    def _positive(self) -> "LogUniform":
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low:g}")
        return self


class IntRange(_Range):
    """An integer drawn uniformly from low..high (both included); `log` for widths and sizes."""

    dist: Literal["int"]
    """Distribution name."""
    log: bool = False
    """Sample uniformly in log space (low must then be >= 1)."""

    @model_validator(mode="after")
    def _integral(self) -> "IntRange":
        if self.low != math.floor(self.low) or self.high != math.floor(self.high):
            raise ValueError(f"int bounds must be whole numbers, got {self.low:g}..{self.high:g}")
        if self.log and self.low < 1:
            raise ValueError(f"int with log: true needs low >= 1, got {self.low:g}")
        return self


class Choice(StrictModel):
    """One of a list of values, drawn at random (or modelled by the Bayesian searchers)."""

    dist: Literal["choice"]
    """Distribution name."""
    values: list[Any] = Field(min_length=1)
    """The candidate values; any YAML value the field accepts (numbers, lists, strings)."""


class Grid(StrictModel):
    """Every value is tried (times `num_samples`); for the `random` and `grid` searchers."""

    dist: Literal["grid"]
    """Distribution name."""
    values: list[Any] = Field(min_length=1)
    """The values to try, each in its own trial."""


Distribution = Annotated[Uniform | LogUniform | IntRange | Choice | Grid, Field(discriminator="dist")]


class SchedulerConfig(StrictModel):
    """Early stopping (or population-based training); every option has a sensible default."""

    name: Literal["fifo", "asha", "hyperband", "median", "pbt"] = "fifo"
    """fifo: run every trial to the end; asha: asynchronous successive halving; hyperband:
    synchronous HyperBand (with searcher bohb: Ray's HyperBandForBOHB, the only scheduler bohb
    accepts and its default); median: stop trials below the median of others at the same epoch;
    pbt: population-based training (copies good trials' checkpoints into bad ones and perturbs
    their hyperparameters)."""
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before it may be stopped (asha, median)."""
    reduction_factor: float = Field(3, gt=1)
    """asha/hyperband: keep 1/reduction_factor of the trials at each rung."""
    max_t: int | None = Field(None, ge=1)
    """Epochs a trial may run at most; default `train.epochs`."""
    min_samples_required: int = Field(3, ge=1)
    """median: trials needed at an epoch before the rule stops anything."""
    perturbation_interval: int = Field(1, ge=1)
    """pbt: epochs between exploit/explore steps."""
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    """pbt: the bottom fraction copies the top fraction."""
    resample_probability: float = Field(0.25, ge=0, le=1)
    """pbt: chance that a perturbed value is drawn again from the space instead of scaled."""
    synch: bool = False
    """pbt: exploit at each perturbation point only once every trial has reached it (faster
    trials wait, paused from their checkpoint); reproducible, where the default (asynchronous)
    keeps every trial busy."""


class ObjectiveConfig(StrictModel):
    """One objective of a multi-objective search (`tune.metrics`)."""

    name: str
    """A key every training reports: `val_<metric>`, `best_val_<metric>`, `train_loss`, or a cost:
    `time_total_s` (the trial's training time so far), `epoch_time_s`, `samples_per_s`."""
    mode: Literal["min", "max"] | None = None
    """Whether smaller or larger is better; default from the metric (loss/mse/mae/time: min)."""


class TuneConfig(StrictModel):
    """A hyperparameter search over trainings of this run config."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    """Experiment name; the experiment directory is `<storage>/<name>`. Default `<name>-tune`.
    Running the same experiment again continues it."""
    space: dict[str, Distribution] = Field(min_length=1)
    """Config fields by dotted path (`train.optimizer.lr`) and the distribution to draw each
    from."""
    metric: str | None = None
    """Reported key to optimise, e.g. `val_accuracy`, `val_loss`, `best_val_f1`; default
    `val_<train.metric>`."""
    mode: Literal["min", "max"] | None = None
    """Whether smaller or larger is better; default from the metric (loss/mse/mae: min)."""
    metrics: list[ObjectiveConfig] | None = Field(None, min_length=2)
    """Several objectives at once instead of `metric`/`mode` (e.g. `[{name: val_accuracy, mode:
    max}, {name: time_total_s, mode: min}]`): searcher `tpe` (Optuna's multi-objective TPE) or
    `random`/`grid`; each trial is scored by its last result, results mark the Pareto front and
    `stoker tune CONFIG --pick INDEX` writes best.yaml for one of its trade-offs. Schedulers
    (early stopping, PBT) and the progress lines use the first metric."""
    warm_start: list[str] = Field(default_factory=list)
    """Earlier experiment directories (`<storage>/<tune.name>`, one path or a list) whose
    finished trials the searcher learns from before it suggests new ones; searcher `tpe`, same
    space paths and distribution kinds (bounds and choices may differ: earlier trials outside
    this space are left out), and the earlier searches must have recorded this search's
    metric(s)."""
    num_samples: int = Field(10, ge=1)
    """Trials to run (with `grid` distributions: repetitions of the whole grid)."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once; capped (and defaulted) to what the cluster's CPUs/GPUs fit
    given each trial's workers, so trials cannot deadlock each other."""
    time_budget_s: float | None = Field(None, gt=0)
    """Stop starting and running trials after this many seconds of search."""
    searcher: Literal["random", "grid", "tpe", "bayesopt", "bohb"] = "random"
    """random: independent draws; grid: every combination of grid/choice values; tpe: Optuna's
    Tree-structured Parzen Estimator; bayesopt: Gaussian-process Bayesian optimisation
    (continuous and int parameters only); bohb: Bayesian optimisation with HyperBand (kernel
    density models per HyperBand budget; needs `pip install -e '.[bohb]'`), which runs only with
    `scheduler: hyperband` (the default when `scheduler.name` is not given) and takes no `grid`
    distributions."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    """Early stopping or population-based training."""
    seed: int = 0
    """Seed of the searcher and scheduler; same seed and space, same trial configs."""
    history_window: int = Field(1000, ge=250)
    """tpe: finished trials the searcher models at each suggestion, so that a suggestion costs
    the same at trial 10,000 as at trial 1,000 (about 10 ms on an idle CPU at the default): the
    best tenth of them and the most recent rest. TPE's good model is fitted on the best 25
    trials (one objective), which the window always keeps; only its bad model sees recent
    trials instead of all of them. A search with fewer finished trials is modelled on every
    one; see stoker.tune.bounded_tpe."""
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    """Configurations (dotted path -> value) tried first, e.g. a known good one. Paths not
    given take the value of the base config."""
    max_failures: int = Field(0, ge=0)
    """Times a failed trial is retried from its last checkpoint."""
    in_process: bool = True
    """Run single-worker trials (scaling.num_workers 1, not searched) in the trial's own
    process instead of a nested one-worker TorchTrainer: same DeepSpeed loop, checkpoints and
    reports, without a controller, worker actor and placement group per trial."""

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, value: Any) -> Any:
        # `scheduler: asha` is the common case; the mapping form carries options.
        return {"name": value} if isinstance(value, str) else value

    @field_validator("warm_start", mode="before")
    @classmethod
    def _one_path(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_way_to_name_the_metric(self) -> "TuneConfig":
        if self.metrics is None:
            return self
        if self.metric is not None or self.mode is not None:
            raise ConfigKeyError("tune.metrics", "give tune.metric/tune.mode or tune.metrics, not both")
        names = [objective.name for objective in self.metrics]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigKeyError("tune.metrics", f"{repeated[0]} is listed twice")
        if self.searcher not in ("tpe", "random", "grid"):
            raise ConfigKeyError("tune.metrics", f"searcher {self.searcher} optimises one metric; "
                                 f"use tpe (multi-objective TPE), random or grid")
        return self

    @model_validator(mode="after")
    def _bohb_runs_with_hyperband(self) -> "TuneConfig":
        if self.searcher != "bohb":
            return self
        # BOHB models each HyperBand budget (rung) separately and learns only from the results
        # HyperBandForBOHB tags with one; under any other scheduler it would learn nothing.
        if "name" not in self.scheduler.model_fields_set:
            self.scheduler = self.scheduler.model_copy(update={"name": "hyperband"})
        elif self.scheduler.name != "hyperband":
            raise ConfigKeyError("tune.scheduler.name", f"searcher bohb needs scheduler hyperband "
                                  f"(or no scheduler.name), got {self.scheduler.name}")
        return self
