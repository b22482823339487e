"""Warm starts (tune.warm_start): earlier experiments' finished trials reach the searcher before
it suggests anything; what is not a finished experiment, or has another space or metric, is
refused naming the key. Fast: no Ray cluster (experiments written from synthetic results)."""

import json
import math

import numpy as np
import pytest
from ray.tune.search import ConcurrencyLimiter

from stoker.errors import UserError
from stoker.tune import findings
from stoker.tune.algorithms import build_searcher
from stoker.tune.objectives import objectives_of, searcher_objectives
from stoker.tune.space import param_space
from stoker.tune.warm_start import load_warm_start
from tests.tune.synthetic import SPACE, result, search_results, table_of, tune_config

NOISE = np.random.default_rng(5)


def accuracy(values):
    return {"val_accuracy": 0.95 - 0.2 * abs(math.log10(values["train.optimizer.lr"]) + 2.5)
            + float(NOISE.normal(0, 0.003)), "time_total_s": values["train.batch_size"] / 10}


def experiment(directory, tune_cfg, results, metric="val_accuracy", mode="max"):
    """An experiment directory as a finished search leaves it."""
    directory.mkdir(parents=True)
    (directory / "stoker_experiment.json").write_text("{}\n")
    found = findings.add_findings(results, table_of(results, tune_cfg, metric, mode), tune_cfg, metric, mode, directory)
    found.table.to_parquet(directory / "results.parquet")
    return directory


def test_earlier_trials_reach_the_study_and_steer_the_first_suggestions(tmp_path):
    earlier_cfg = tune_config(seed=1)
    old = experiment(tmp_path / "old", earlier_cfg, search_results(earlier_cfg, 30, accuracy, seed=1))
    tune_cfg = tune_config(warm_start=str(old), seed=7)
    warm = load_warm_start(tune_cfg, ["val_accuracy"])
    assert warm.taken == {str(old): 30} and warm.left_out == 0
    assert warm.summary() == f"warm start: 30 earlier trials taken (30 from {old})"

    searcher = ConcurrencyLimiter(build_searcher(tune_cfg, [], 1, warm.optuna_storage(tune_cfg, ["max"])), 1)
    searcher.set_search_properties("val_accuracy", "max", param_space(tune_cfg))
    study = searcher.searcher._ot_study  # the one look inside Ray's wrapper: its study holds them
    assert len(study.trials) == 30 and study.best_value == pytest.approx(warm.values and max(v[0] for v in warm.values))
    # Lists (layer widths) reach Optuna encoded as the searcher's own choices are.
    assert {t.params["model/hidden"] for t in study.trials} <= {"[16]", "[32, 16]", "[64]"}
    # With 30 results already, TPE models from its first suggestion: lr near the known optimum
    # (3e-3), where draws from the whole range would average 0.75 decades away.
    distances = []
    for index in range(6):
        config = searcher.suggest(f"n{index}")
        distances.append(abs(math.log10(config["train"]["optimizer"]["lr"]) + 2.5))
        searcher.on_trial_complete(f"n{index}", {"val_accuracy": 0.5})
    assert np.median(distances) < 0.4, distances


def test_two_objectives_and_several_experiments_with_trials_outside_a_narrowed_space(tmp_path):
    wide = tune_config(metrics=[{"name": "val_accuracy", "mode": "max"}, {"name": "time_total_s"}])
    first = experiment(tmp_path / "a", wide, search_results(wide, 10, accuracy, seed=2))
    second = experiment(tmp_path / "b", wide, [*search_results(wide, 5, accuracy, seed=3),
                                               result("terr", wide, {"train.optimizer.lr": 0.01,
                                                                     "train.optimizer.weight_decay": 0.0,
                                                                     "model.hidden": [64], "train.batch_size": 64},
                                                      accuracy({"train.optimizer.lr": 0.01, "train.batch_size": 64}),
                                                      error=True)])
    space = json.loads(json.dumps(SPACE))
    space["train.batch_size"]["high"] = 64  # narrowed: earlier trials above 64 are left out
    tune_cfg = tune_config(space=space, metrics=wide.model_dump(mode="json")["metrics"],
                           warm_start=[str(first), str(second)])
    warm = load_warm_start(tune_cfg, [o.name for o in objectives_of(tune_cfg)])
    inside = [r for r in search_results(wide, 10, accuracy, seed=2) + search_results(wide, 5, accuracy, seed=3)
              if r.metrics["config"]["train"]["batch_size"] <= 64]
    assert len(warm.params) == len(inside) and warm.left_out == 16 - len(inside)
    assert all(len(v) == 2 for v in warm.values)
    options = searcher_objectives(objectives_of(tune_cfg)) | warm.optuna_storage(tune_cfg, ["max", "min"])
    searcher = build_searcher(tune_cfg, [], 1, options)
    searcher.set_search_properties(None, None, param_space(tune_cfg))
    assert [t.values for t in searcher._ot_study.trials] == warm.values
    assert searcher.suggest("new")["train"]["batch_size"] <= 64


def finished(tmp_path, name="old", **overrides):
    tune_cfg = tune_config(**overrides)
    return experiment(tmp_path / name, tune_cfg, search_results(tune_cfg, 5, accuracy))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("train.optimizer.weight_decay"),
     r"the search space differs at tune.space.train.optimizer.weight_decay \(only .*old's space has it\)"),
    (lambda s: s.update({"model.dropout": {"dist": "uniform", "low": 0, "high": 0.5}}),
     r"the search space differs at tune.space.model.dropout \(only this search's space has it\)"),
    (lambda s: s.update({"train.optimizer.lr": {"dist": "uniform", "low": 1e-4, "high": 0.1}}),
     r"the search space differs at tune.space.train.optimizer.lr \(loguniform in .*old, uniform 0.0001..0.1 here\)"),
    (lambda s: s.update({"train.batch_size": {"dist": "int", "low": 16, "high": 128, "log": True}}),
     r"the search space differs at tune.space.train.batch_size \(int 16..128 in .*old, int 16..128 here\)"),
])
def test_a_different_space_is_refused_naming_the_key(tmp_path, change, message):
    old = finished(tmp_path)
    space = json.loads(json.dumps(SPACE))
    change(space)
    with pytest.raises(UserError, match=r"^tune.warm_start\[0\]: " + message + "$"):
        load_warm_start(tune_config(space=space, warm_start=str(old)), ["val_accuracy"])


def test_what_is_not_a_finished_experiment_or_lacks_the_metric_is_refused(tmp_path):
    old = finished(tmp_path)
    with pytest.raises(UserError, match=r"^tune.warm_start\[1\]: .*nowhere is not a stoker tune experiment "
                                        r"\(no stoker_experiment.json\)$"):
        load_warm_start(tune_config(warm_start=[str(old), str(tmp_path / "nowhere")]), ["val_accuracy"])
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "stoker_experiment.json").write_text("{}")
    with pytest.raises(UserError, match=r"^tune.warm_start\[0\]: .*unfinished has no finished results"):
        load_warm_start(tune_config(warm_start=str(tmp_path / "unfinished")), ["val_accuracy"])
    with pytest.raises(UserError, match=r"^tune.warm_start\[0\]: .*old did not record val_loss \(it optimised "
                                        r"val_accuracy\); warm starts need the same tune.metric/tune.metrics$"):
        load_warm_start(tune_config(warm_start=str(old)), ["val_loss"])
    with pytest.raises(UserError, match=r"^tune.warm_start: searcher random learns nothing from earlier trials"):
        load_warm_start(tune_config(warm_start=str(old), searcher="random"), ["val_accuracy"])
    assert load_warm_start(tune_config(), ["val_accuracy"]) is None
