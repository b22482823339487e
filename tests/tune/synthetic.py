"""Finished searches made up in memory: Ray Tune `Result`s of trials whose scores follow a known
formula of their hyperparameters, turned into stoker's results table by the real code."""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from ray.tune import Result

from stoker.tune.config import TuneConfig
from stoker.tune.results import results_table
from stoker.tune.space import encode, set_path

SPACE = {
    "train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.1},
    "train.optimizer.weight_decay": {"dist": "uniform", "low": 0.0, "high": 0.1},
    "model.hidden": {"dist": "choice", "values": [[16], [32, 16], [64]]},
    "train.batch_size": {"dist": "int", "low": 16, "high": 128},
}
EPOCHS = 2


def tune_config(**overrides) -> TuneConfig:
    return TuneConfig.model_validate({"space": SPACE, "searcher": "tpe", **overrides})


def draw(tune_cfg: TuneConfig, rng: np.random.Generator) -> dict[str, Any]:
    """One trial's values by dotted path, drawn like a random searcher would."""
    values = {}
    for path, dist in tune_cfg.space.items():
        if dist.dist == "loguniform":
            values[path] = float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
        elif dist.dist == "uniform":
            values[path] = float(rng.uniform(dist.low, dist.high))
        elif dist.dist == "int":
            values[path] = int(rng.integers(int(dist.low), int(dist.high) + 1))
        else:
            values[path] = dist.values[int(rng.integers(len(dist.values)))]
    return values


def result(trial: str, tune_cfg: TuneConfig, values: dict[str, Any], scores: dict[str, float],
           error: bool = False) -> Result:
    """A trial's Result as Tune hands it over: its nested config (choices encoded as the
    searcher saw them), its last result and a history of EPOCHS epochs ending in `scores`."""
    config: dict[str, Any] = {}
    for path, value in values.items():
        set_path(config, path, encode(tune_cfg.space[path], value))
    last = {"trial_id": trial, "config": config, "training_iteration": EPOCHS, "time_total_s": 1.0, **scores}
    history = pd.DataFrame([{**{k: v * 0.9 for k, v in scores.items()}, "training_iteration": 1},
                            {**scores, "training_iteration": EPOCHS}])
    return Result(metrics=last, checkpoint=None, error=RuntimeError("boom") if error else None,
                  path=f"/tmp/experiment/{trial}", metrics_dataframe=history)


def search_results(tune_cfg: TuneConfig, n: int, score: Callable[[dict[str, Any]], dict[str, float]],
                   seed: int = 0) -> list[Result]:
    rng = np.random.default_rng(seed)
    results = []
    for index in range(n):
        values = draw(tune_cfg, rng)
        results.append(result(f"t{index:04d}", tune_cfg, values, score(values)))
    return results


def table_of(results, tune_cfg: TuneConfig, metric: str, mode: str) -> pd.DataFrame:
    return results_table(results, tune_cfg, metric, mode, EPOCHS)
