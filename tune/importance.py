"""Which hyperparameters mattered: Optuna's importance of each `tune.space` path for each
objective, computed from the results table of any searcher.

The finished trials become an in-memory Optuna study (their values, the space's
distributions, their scores), which Optuna's importance evaluators read. fANOVA (a random
forest's variance decomposition) is the more reliable on small searches but its cost grows
fast (about 2 s at 40 trials, 90 s at 2,000 on this machine); PED-ANOVA (Optuna's default:
where the best trials' values lie against where all of them lie) takes milliseconds at
10,000 trials but needs enough trials in its top quantile. So: fANOVA up to FANOVA_MAX_TRIALS
scored trials, PED-ANOVA above. Importances sum to 1 per objective; with few trials they are
rough.
"""

import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from stoker.atomic import atomic_file
from stoker.trainer.ranking import direction
from stoker.tune.config import Choice, Grid, IntRange, LogUniform, TuneConfig
from stoker.tune.results import _cell
from stoker.tune.space import within

MIN_TRIALS = 4
"""Scored trials needed before importances are computed at all."""
FANOVA_MAX_TRIALS = 50
"""Up to this many scored trials fANOVA, above it PED-ANOVA (see the module docstring)."""
FILE = "importance.csv"


def distribution(dist) -> BaseDistribution:
    """The Optuna distribution of a space entry, over the values as the results table holds
    them (lists as their YAML text)."""
    if isinstance(dist, Choice | Grid):
        return CategoricalDistribution(list(dict.fromkeys(_cell(v) for v in dist.values)))
    if isinstance(dist, IntRange):
        return IntDistribution(int(dist.low), int(dist.high), log=dist.log)
    return FloatDistribution(dist.low, dist.high, log=isinstance(dist, LogUniform))


def study_of(table: pd.DataFrame, tune_cfg: TuneConfig, column: str, mode: str) -> optuna.Study:
    """An in-memory study of the table's scored trials (not errored, `column` reported), with
    each trial's space values and its `column` as the objective value."""
    distributions = {path: distribution(dist) for path, dist in tune_cfg.space.items()}
    study = optuna.create_study(direction=direction(mode))
    trials = []
    for row in table.to_dict("records"):  # (iterrows builds a Series per row: slow at 10,000)
        value = _plain(row.get(column))
        if row["status"] == "error" or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        params = {path: _plain(row[path]) for path in distributions}
        if not all(_holds(tune_cfg.space[p], distributions[p], v) for p, v in params.items()):
            continue  # a value outside today's space (an earlier search's row): nothing holds it
        trials.append(optuna.trial.create_trial(params=params, distributions=distributions, value=float(value)))
    study.add_trials(trials)
    return study


def _holds(dist, optuna_dist: BaseDistribution, value) -> bool:
    if isinstance(optuna_dist, CategoricalDistribution):
        return value in optuna_dist.choices
    return within(dist, value)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def evaluator_for(trials: int, seed: int) -> tuple[optuna.importance.BaseImportanceEvaluator, str]:
    """The importance evaluator for a study of `trials` scored trials, and its name."""
    if trials <= FANOVA_MAX_TRIALS:
        return optuna.importance.FanovaImportanceEvaluator(seed=seed), "fANOVA"
    # At least ~10 trials in the top quantile PED-ANOVA contrasts with the rest.
    return optuna.importance.PedAnovaImportanceEvaluator(target_quantile=max(0.1, min(0.5, 10 / trials))), "PED-ANOVA"


def param_importances(table: pd.DataFrame, tune_cfg: TuneConfig, objectives: list[tuple[str, str, str]]) -> pd.DataFrame:
    """One row per space path, one column per objective (`(name, table column, mode)`), each
    the path's share of that objective's importance, most important first (on the first
    objective); empty when fewer than MIN_TRIALS trials were scored. `attrs["method"]` names
    the evaluator(s), `attrs["trials"]` the scored trials of the first objective."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    columns, methods, counts = {}, [], []
    for name, column, mode in objectives:
        if column not in table:
            continue
        study = study_of(table, tune_cfg, column, mode)
        # (`study.trials` deep-copies every trial on each access: a second or more at 10,000.)
        scored = study.get_trials(deepcopy=False)
        if len(scored) < MIN_TRIALS or len({t.value for t in scored}) < 2:
            continue  # too few, or every trial scored the same: nothing to attribute
        evaluator, method = evaluator_for(len(scored), tune_cfg.seed)
        try:
            columns[name] = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except RuntimeError:
            continue  # fANOVA's "zero total variance in all trees": no split explains anything

        methods.append(method)
        counts.append(len(scored))
    if not columns:
        return pd.DataFrame(columns=["parameter"])
    frame = pd.DataFrame(columns).reindex(list(tune_cfg.space)).fillna(0.0).astype(float)
    frame = frame.sort_values(next(iter(columns)), ascending=False, kind="stable")
    frame.index.name = "parameter"
    frame = frame.reset_index()
    frame.attrs.update(method=" / ".join(dict.fromkeys(methods)), trials=counts[0])
    return frame


def write_importance(frame: pd.DataFrame, directory: Path) -> Path:
    path = directory / FILE
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path
