"""Hyperparameter importance (Optuna PED-ANOVA) from a results table where one parameter is
known to drive the metric. Fast: no Ray cluster."""

import math

import numpy as np
import pytest

from stoker.tune.importance import MIN_TRIALS, param_importances, study_of, write_importance
from tests.tune.synthetic import result, search_results, table_of, tune_config

NOISE = np.random.default_rng(1)


def lr_drives_accuracy(values):
    # Best near lr 3e-3; the other parameters do nothing but noise.
    return {"val_accuracy": 0.95 - 0.2 * abs(math.log10(values["train.optimizer.lr"]) + 2.5)
            + float(NOISE.normal(0, 0.005))}


@pytest.mark.parametrize("trials, method", [(40, "fANOVA"), (400, "PED-ANOVA")])
def test_the_parameter_that_drives_the_metric_ranks_first(trials, method):
    # Importance reads the results table alone, whichever searcher proposed the trials.
    tune_cfg = tune_config(searcher="random")
    table = table_of(search_results(tune_cfg, trials, lr_drives_accuracy), tune_cfg, "val_accuracy", "max")
    frame = param_importances(table, tune_cfg, [("val_accuracy", "val_accuracy", "max")])
    assert frame.attrs == {"method": method, "trials": trials}
    assert list(frame["parameter"])[0] == "train.optimizer.lr", frame
    assert set(frame["parameter"]) == set(tune_cfg.space)
    lr = frame.set_index("parameter")["val_accuracy"]
    assert lr["train.optimizer.lr"] > 2 * lr.drop("train.optimizer.lr").max(), frame
    assert lr.sum() == pytest.approx(1.0)


def test_a_list_valued_choice_that_drives_a_minimised_metric_ranks_first():
    tune_cfg = tune_config()
    loss = {"[16]": 1.0, "[32, 16]": 0.3, "[64]": 0.6}

    def score(values):
        return {"val_loss": loss[str(values["model.hidden"]).replace(" ", "")
                                 .replace(",", ", ")] + float(NOISE.normal(0, 0.01))}

    table = table_of(search_results(tune_cfg, 40, score, seed=2), tune_cfg, "val_loss", "min")
    assert table["model.hidden"].isin(["[16]", "[32, 16]", "[64]"]).all(), table["model.hidden"]
    frame = param_importances(table, tune_cfg, [("val_loss", "val_loss", "min")])
    assert list(frame["parameter"])[0] == "model.hidden", frame


def test_each_objective_gets_its_own_ranking():
    tune_cfg = tune_config()

    def score(values):
        return {"val_accuracy": lr_drives_accuracy(values)["val_accuracy"],
                "time_total_s": values["train.batch_size"] * 0.5 + float(NOISE.normal(0, 0.5))}

    results = search_results(tune_cfg, 40, score, seed=3)
    table = table_of(results, tune_cfg, "val_accuracy", "max")
    table["last_time_total_s"] = [r.metrics["time_total_s"] for r in results]
    frame = param_importances(table, tune_cfg, [("val_accuracy", "last_val_accuracy", "max"),
                                                ("time_total_s", "last_time_total_s", "min")]).set_index("parameter")
    assert frame["val_accuracy"].idxmax() == "train.optimizer.lr", frame
    assert frame["time_total_s"].idxmax() == "train.batch_size", frame


def test_errored_unscored_and_out_of_space_trials_are_left_out_and_too_few_give_none(tmp_path):
    tune_cfg = tune_config()
    good = search_results(tune_cfg, MIN_TRIALS - 1, lr_drives_accuracy)
    values = {"train.optimizer.lr": 0.003, "train.optimizer.weight_decay": 0.0, "model.hidden": [16],
              "train.batch_size": 16}
    errored = result("terr", tune_cfg, values, {"val_accuracy": 0.99}, error=True)
    unscored = result("tnan", tune_cfg, values, {"val_loss": 0.1})
    table = table_of([*good, errored, unscored], tune_cfg, "val_accuracy", "max")
    # A row from a wider space (a warm start's earlier search) has no place in this one.
    narrower = tune_config(space={**tune_cfg.model_dump(mode="json")["space"],
                                  "train.batch_size": {"dist": "int", "low": 16, "high": 20}})
    assert len(study_of(table, tune_cfg, "val_accuracy", "max").trials) == MIN_TRIALS - 1
    assert len(study_of(table, narrower, "val_accuracy", "max").trials) <= MIN_TRIALS - 1
    frame = param_importances(table, tune_cfg, [("val_accuracy", "val_accuracy", "max")])
    assert frame.empty
    assert write_importance(frame, tmp_path).read_text().strip() == "parameter"


def test_a_metric_every_trial_scored_the_same_gives_no_importance():
    tune_cfg = tune_config()
    table = table_of(search_results(tune_cfg, 8, lambda values: {"val_accuracy": 0.9}), tune_cfg, "val_accuracy", "max")
    assert param_importances(table, tune_cfg, [("val_accuracy", "val_accuracy", "max")]).empty
