"""Warm starts (`tune.warm_start`): the finished trials of earlier experiments, fed to the
searcher before it suggests anything, so a new search starts from what earlier ones learned.

Each finished search leaves its space and objectives in `search_space.json` beside its results
table; a warm start reads both. The earlier trials become completed trials of the Optuna study
that Ray's `OptunaSearch` then loads (`storage=`, Optuna's own API for a study that already
holds trials): the TPE sampler models them exactly like trials of this search, for one
objective or several, without being run again.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray.tune.search.optuna import OptunaSearch

from stoker.atomic import write_json
from stoker.errors import UserError
from stoker.trainer.ranking import direction
from stoker.tune.config import TuneConfig
from stoker.tune.results import _uncell
from stoker.tune.space import describe, encode, param_space, within

SPACE_FILE = "search_space.json"
RESULTS_FILE = "results.parquet"
EXPERIMENT_FILE = "stoker_experiment.json"  # what runner.STATE_FILE names: every experiment has one
STUDY_NAME = "stoker"


def write_space(tune_cfg: TuneConfig, objectives: list[tuple[str, str]], directory: Path) -> None:
    """Record the search's space and objectives (name, mode) for later warm starts."""
    payload = {"space": {p: d.model_dump(mode="json") for p, d in tune_cfg.space.items()},
               "objectives": [{"name": n, "mode": mode} for n, mode in objectives]}
    write_json(directory / SPACE_FILE, payload)


@dataclass
class WarmStart:
    """Earlier trials ready for the searcher: Optuna params (flattened paths, values as the
    searcher sees them) and each trial's objective value(s)."""

    params: list[dict[str, Any]] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)
    taken: dict[str, int] = field(default_factory=dict)
    """Source directory -> trials taken from it."""
    left_out: int = 0
    """Finished trials outside this space, errored or without every objective."""

    def summary(self) -> str:
        sources = ", ".join(f"{n} from {p}" for p, n in self.taken.items())
        left = f"; {self.left_out} left out (errored, unscored or outside this space)" if self.left_out else ""
        return f"warm start: {len(self.params)} earlier trials taken ({sources}){left}"

    def optuna_storage(self, tune_cfg: TuneConfig, modes: list[str]) -> dict[str, Any]:
        """OptunaSearch's `storage`/`study_name`: an in-memory study that already holds the
        earlier trials, with the distributions OptunaSearch itself derives from the space."""
        distributions = OptunaSearch.convert_search_space(param_space(tune_cfg))
        storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                    directions=[direction(m) for m in modes])
        study.add_trials([optuna.trial.create_trial(params=p, distributions=distributions, values=v)
                          for p, v in zip(self.params, self.values, strict=True)])
        return {"storage": storage, "study_name": STUDY_NAME}


def load_warm_start(tune_cfg: TuneConfig, objectives: list[str]) -> WarmStart | None:
    """The finished trials of `tune.warm_start`'s experiments scored on `objectives` (metric
    names), or None without a warm start; UserError naming the key for a path that is not a
    finished experiment, a space that differs or a metric the earlier search did not record."""
    if not tune_cfg.warm_start:
        return None
    if tune_cfg.searcher != "tpe":
        raise UserError(f"tune.warm_start: searcher {tune_cfg.searcher} learns nothing from earlier trials; "
                        f"use searcher tpe")
    warm = WarmStart()
    for index, given in enumerate(tune_cfg.warm_start):
        key = f"tune.warm_start[{index}]"
        if "://" in given:
            # An experiment on S3 storage has a staging copy where it ran (stoker.tune.storage).
            raise UserError(f"{key}: {given}: warm starts read a local or shared experiment directory; "
                            f"give the search's local copy (the path `stoker tune` printed as staged at)")
        directory = Path(os.path.abspath(given))
        table, space = _read_experiment(key, directory)
        _check_space(key, directory, space, tune_cfg)
        columns = []
        for name in objectives:
            if f"last_{name}" not in table:
                recorded = sorted(c.removeprefix("last_") for c in table.columns if c.startswith("last_"))
                raise UserError(f"{key}: {directory} did not record {name} (it optimised {', '.join(recorded)}); "
                                f"warm starts need the same tune.metric/tune.metrics")
            columns.append(f"last_{name}")
        taken = 0
        for _, row in table.iterrows():
            point = _point(row, tune_cfg)
            scores = [float(row[c]) for c in columns if _finite(row[c])]
            if row["status"] == "error" or point is None or len(scores) < len(columns):
                warm.left_out += 1
                continue
            warm.params.append(point)
            warm.values.append(scores)
            taken += 1
        warm.taken[str(directory)] = taken
    return warm


def _read_experiment(key: str, directory: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    if not (directory / EXPERIMENT_FILE).is_file():
        raise UserError(f"{key}: {directory} is not a stoker tune experiment (no {EXPERIMENT_FILE})")
    if not (directory / RESULTS_FILE).is_file() or not (directory / SPACE_FILE).is_file():
        raise UserError(f"{key}: {directory} has no finished results ({RESULTS_FILE}, {SPACE_FILE}); "
                        f"finish that search first")
    return pd.read_parquet(directory / RESULTS_FILE), json.loads((directory / SPACE_FILE).read_text())["space"]


def _check_space(key: str, directory: Path, earlier: dict[str, Any], tune_cfg: TuneConfig) -> None:
    """Same paths, same kind of distribution per path; bounds and choice lists may differ."""
    for path in sorted(set(earlier) ^ set(tune_cfg.space)):
        where = "only this search's" if path in tune_cfg.space else f"only {directory}'s"
        raise UserError(f"{key}: the search space differs at tune.space.{path} ({where} space has it)")
    for path, dist in tune_cfg.space.items():
        then = earlier[path]
        if then["dist"] != dist.dist or then.get("log", False) != getattr(dist, "log", False):
            then_text = describe(type(dist).model_validate(then)) if then["dist"] == dist.dist else then["dist"]
            raise UserError(f"{key}: the search space differs at tune.space.{path} "
                            f"({then_text} in {directory}, {describe(dist)} here)")


def _point(row: pd.Series, tune_cfg: TuneConfig) -> dict[str, Any] | None:
    """The row's values as Optuna params (flattened path -> encoded value), or None when one lies
    outside this search's space."""
    point = {}
    for path, dist in tune_cfg.space.items():
        # The table holds list values (layer widths) as their YAML text.
        like = [] if any(isinstance(v, list | dict) for v in getattr(dist, "values", [])) else None
        value = _uncell(row[path], like)
        if dist.dist == "int" and isinstance(value, float) and value == int(value):
            value = int(value)
        if not within(dist, value):
            return None
        point[path.replace(".", "/")] = encode(dist, value)
    return point


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
