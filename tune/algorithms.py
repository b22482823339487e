"""Searchers (which configs to try) and schedulers (which trials to stop) from the config.

Every scheduler counts time in `training_iteration`, which is one reported epoch, and Tune
restores it from its experiment snapshot, so rung boundaries survive an experiment restore (a
driver killed between a checkpoint and the snapshot after it loses that one epoch's count).
"""

import logging
import random
import warnings
from typing import Any

import numpy as np
import optuna
from ray.tune import schedulers
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.bayesopt import BayesOptSearch
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

from stoker.errors import UserError
from stoker.tune import hyperband
from stoker.tune.bounded_tpe import bounded_storage
from stoker.tune.config import TuneConfig
from stoker.tune.space import param_space

TIME_ATTR = "training_iteration"
STUDY_NAME = "optuna"  # what Ray's OptunaSearch names its study when given none


def build_searcher(tune_cfg: TuneConfig, points: list[dict[str, Any]], max_concurrent: int = 0,
                   optuna_options: dict[str, Any] | None = None):
    """The search algorithm; `points` are points_to_evaluate in Tune's nested form.
    `optuna_options`: more OptunaSearch arguments (tpe): the metric and mode lists of a
    multi-objective search (`stoker.tune.objectives`), the study of a warm start
    (`stoker.tune.warm_start`)."""
    seed = tune_cfg.seed
    if tune_cfg.searcher in ("random", "grid"):
        # Tune ignores TuneConfig.max_concurrent_trials for this one: it must be given here.
        return BasicVariantGenerator(points_to_evaluate=points or None, random_state=seed,
                                     max_concurrent=max_concurrent)
    # The model-based searchers name parameters by their flattened path ("train/optimizer/lr")
    # and silently ignore nested points.
    points = [flatten_dict(point, delimiter="/") for point in points]
    if tune_cfg.searcher == "bohb":
        return _bohb(tune_cfg, points)
    if tune_cfg.searcher == "tpe":
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        options = dict(optuna_options or {})
        # TPE would otherwise read every finished trial at each suggestion (stoker.tune.bounded_tpe).
        options["storage"] = bounded_storage(tune_cfg.history_window, options.get("storage"),
                                             options.setdefault("study_name", STUDY_NAME))
        return OptunaSearch(points_to_evaluate=points or None, sampler=optuna.samplers.TPESampler(seed=seed),
                            **options)
    return BayesOptSearch(points_to_evaluate=points or None, random_state=seed, verbose=0)


def _bohb(tune_cfg: TuneConfig, points: list[dict[str, Any]]):
    # BOHB's packages are an optional extra (`.[bohb]`): looked for only when asked for.
    try:
        import ConfigSpace  # noqa: F401
        import hpbandster  # noqa: F401
    except ImportError:
        raise UserError("tune.searcher: bohb needs the hpbandster and ConfigSpace packages (pip install -e '.[bohb]')") from None
    # statsmodels' KDE warns on every model fit that its default generator will change; BOHB
    # picks the bandwidth by the normal reference rule, which draws no random numbers at all.
    warnings.filterwarnings("ignore", message=r"After 0\.17 or January 2028", category=FutureWarning)
    # When every good (or bad) config of a budget shares one choice value, the categorical
    # kernel divides by zero; hpbandster then skips those candidates (NaN score) and logs each
    # with its whole KDE data at WARNING. The picks stay sound; the noise would flood the log.
    warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning,
                            module=r"statsmodels\.nonparametric")
    logging.getLogger("hpbandster").setLevel(logging.ERROR)
    # TuneBOHB seeds the ConfigSpace sampler; hpbandster draws its random-vs-model coin and
    # its model-based candidates from NumPy's global generator.
    np.random.seed(tune_cfg.seed)
    return hyperband.ResumableBOHB(points_to_evaluate=points or None, seed=tune_cfg.seed)


def build_scheduler(tune_cfg: TuneConfig, epochs: int):
    """The trial scheduler; `epochs` is the longest a trial trains (the default max_t)."""
    s = tune_cfg.scheduler
    max_t = s.max_t or epochs
    if s.name == "asha":
        return schedulers.ASHAScheduler(
            time_attr=TIME_ATTR, max_t=max_t, grace_period=min(s.grace_period, max_t),
            reduction_factor=s.reduction_factor,
        )
    if s.name == "hyperband":
        # BOHB learns only from the budgets that HyperBandForBOHB tags its results with.
        scheduler = hyperband.HyperBandForBOHB if tune_cfg.searcher == "bohb" else hyperband.HyperBandScheduler
        return scheduler(time_attr=TIME_ATTR, max_t=max_t, reduction_factor=s.reduction_factor)
    if s.name == "median":
        return schedulers.MedianStoppingRule(
            time_attr=TIME_ATTR, grace_period=s.grace_period, min_samples_required=s.min_samples_required,
        )
    if s.name == "pbt":
        if tune_cfg.searcher != "random":
            raise UserError(f"tune.searcher: pbt draws its own population; use searcher random, got {tune_cfg.searcher}")
        # PBT draws perturbations with Python's and NumPy's global generators.
        random.seed(tune_cfg.seed)
        np.random.seed(tune_cfg.seed)
        return hyperband.DonorKeepingPBT(
            time_attr=TIME_ATTR,
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=param_space(tune_cfg),
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            synch=s.synch,
        )
    return schedulers.FIFOScheduler()


def stops_early(tune_cfg: TuneConfig) -> bool:
    return tune_cfg.scheduler.name in ("asha", "hyperband", "median")

