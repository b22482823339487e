"""Each trial's status in the results table (stoker.tune.results)."""

from dataclasses import replace

from stoker.tune.results import results_table
from tests.tune.synthetic import EPOCHS, result, tune_config

VALUES = {"train.optimizer.lr": 0.01, "train.optimizer.weight_decay": 0.0, "model.hidden": [16], "train.batch_size": 32}


def test_an_interrupted_trial_is_unfinished_only_if_it_had_epochs_left():
    cfg = tune_config()
    done = result("t0", cfg, VALUES, {"val_accuracy": 0.9})  # trained all EPOCHS
    partway = result("t1", cfg, VALUES, {"val_accuracy": 0.8})
    partway = replace(partway, metrics={**partway.metrics, "training_iteration": EPOCHS - 1})
    failed = result("t2", cfg, VALUES, {"val_accuracy": 0.7}, error=True)
    # Tune had not recorded the end of any of them when the search was interrupted.
    table = results_table([done, partway, failed], cfg, "val_accuracy", "max", EPOCHS,
                          frozenset({"t0", "t1", "t2"}))
    assert list(table["status"]) == ["completed", "unfinished", "error"]
    # Not interrupted, the one with epochs left was stopped early by its scheduler.
    assert list(results_table([done, partway], cfg, "val_accuracy", "max", EPOCHS)["status"]) == ["completed", "stopped"]
