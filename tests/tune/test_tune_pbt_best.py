"""Population-based training end to end (exploit copies a donor's checkpoint, the perturbed lr
is the one trained with) and `stoker train best.yaml` reproducing the best trial."""

import json

import pytest
import ray

from stoker.config import load_config, parse_config
from stoker.trainer.resources import plan_resources
from stoker.trainer.run import train
from stoker.tune.checkpoints import restore_deleted_pointers
from stoker.tune.runner import search
from stoker.tune.search_log import events
from stoker.tune.trial import shared_train_split
from tests.tune.test_tune_e2e import small

pytestmark = pytest.mark.slow


def test_pbt_exploits_a_donor_checkpoint_and_trains_with_the_perturbed_lr(ray_cluster, prepared, tmp_path):
    # Two trials, one far better than the other; synchronous PBT, so at every epoch boundary the
    # worse one copies the better one's checkpoint whatever order they report in.
    tune = {"num_samples": 2, "max_concurrent_trials": 2, "searcher": "random", "seed": 1,
            "scheduler": {"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5,
                          "resample_probability": 0.0, "synch": True},
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-5, "high": 0.03}},
            "points_to_evaluate": [{"train.optimizer.lr": 0.02}, {"train.optimizer.lr": 1e-5}]}
    run = parse_config(small(prepared, tmp_path, "pbt", tune, epochs=2), "test")
    outcome = search(run, emit=lambda _: None)
    table = outcome.table
    assert len(table) == 2 and set(table["status"]) == {"completed"}, table
    assert list(table["epochs"]) == [2, 2], table

    trials = outcome.path / "trials"
    # An exploit seeds a new Train run `<trial>.<n>` from the donor's checkpoint.
    seeded = sorted(p.name for p in trials.iterdir() if p.is_dir() and "." in p.name)
    assert seeded, sorted(p.name for p in trials.iterdir())
    # The weak trial (lr 1e-5, near chance accuracy) was replaced by a copy of the strong one.
    assert table["val_accuracy"].min() > 0.85, table  # both 0.92 measured; lr 1e-5 alone stays near 0.05
    # The exploit's copies of the donor's pointer are not taken for Tune's own checkpoints when
    # the experiment is restored (restore_deleted_pointers reads `checkpoint_<n>` names).
    donated = [p for p in outcome.path.glob("*/donated_checkpoint_*") if p.is_dir()]
    assert donated and restore_deleted_pointers(outcome.path) is not None

    # Each exploited run must train with the lr Tune restarted its trial with (the search log's
    # start events: PBT restarts a trial with the perturbed config), not the donor's.
    configured: dict[str, set[float]] = {}
    for start in events(outcome.path, "start"):
        configured.setdefault(start["trial"], set()).add(start["params"]["train.optimizer.lr"])
    # PBT scales a donor's value by 0.8 or 1.2 (resample_probability 0).
    perturbed = {trial: lrs - {0.02, 1e-5} for trial, lrs in configured.items()}
    assert any(perturbed.values()), configured
    for run in seeded:
        trained = {json.loads(line)["lr"] for line in (trials / run / "metrics.jsonl").read_text().splitlines()}
        # Resume must apply the config's lr over the one saved in the donor's optimizer state
        # (trainer/hyperparams.py); otherwise PBT's perturbation never reaches the optimizer.
        assert trained and all(any(abs(lr - want) <= 1e-9 * want for want in perturbed[run.split(".")[0]])
                               for lr in trained), (
            f"{run} trained with lr {sorted(trained)} where its trial was restarted with "
            f"{sorted(configured[run.split('.')[0]])}: resume kept the donor's lr")


def test_best_yaml_trains_and_reproduces_the_best_trial(ray_cluster, prepared, tmp_path):
    tune = {"num_samples": 2, "max_concurrent_trials": 2, "searcher": "random", "seed": 5,
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.03},
                      "model.hidden": {"dist": "choice", "values": [[16], [32]]}}}
    # Two epochs: the trials train on the split the search read once for all of them
    # (`shared_train_split`), `stoker train` on its own read of it.
    run = parse_config(small(prepared, tmp_path, "repro", tune, epochs=2), "test")
    assert shared_train_split(run, run.tune, 2, plan_resources(run.scaling, ray.cluster_resources()).read_task_cpus) is not None
    outcome = search(run, emit=lambda _: None)
    table = outcome.table
    best = table.loc[table["val_accuracy"].idxmax()]

    best_run = load_config(outcome.best_config)  # what `stoker train best.yaml` loads
    assert best_run.tune is None and best_run.train.epochs == 2 and best_run.train.seed == run.train.seed
    result = train(best_run)
    assert result.run_dir.name == "repro-tune-best"
    # Same values, seed and epochs as the best trial: the same validation accuracy.
    assert result.validation["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-9)
