"""Single-worker trials that run stoker's loop in the Tune trial's own process: same training as
a nested one-worker TorchTrainer, same run directory, and no placement group at all."""

import json
from pathlib import Path

import pytest
import ray

from stoker.config import parse_config
from stoker.trainer.checkpoints import STATE_FILE
from stoker.tune.checkpoints import finished_result
from stoker.tune.runner import search
from tests.tune.test_tune_e2e import small

pytestmark = pytest.mark.slow


def epochs_logged(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_in_process_trial_trains_like_a_one_worker_torch_trainer(ray_cluster, prepared, tmp_path):
    tune = {"num_samples": 1, "searcher": "random", "seed": 0,
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-3, "high": 0.05}},
            "points_to_evaluate": [{"train.optimizer.lr": 0.01}]}
    logged = {}
    for in_process in (True, False):
        name = f"inproc-{in_process}"
        run = parse_config(small(prepared, tmp_path, name, dict(tune, in_process=in_process)), "test")
        groups_before = set(ray.util.placement_group_table())
        outcome = search(run, emit=lambda _: None)
        table = outcome.table
        assert list(table["status"]) == ["completed"] and table.loc[0, "epochs"] == 2, table
        run_dir = outcome.path / "trials" / table.loc[0, "trial"]
        logged[in_process] = epochs_logged(run_dir)
        # Ray Train's own checkpoint bookkeeping, whoever ran the loop: a later trainer resumes from it.
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].startswith("checkpoint_")
        # A search selects on validation: no trial scores the test split, in either kind of trial.
        state = json.loads((run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] / STATE_FILE).read_text())
        assert state["best"]["validation"]["accuracy"] > 0 and state["best"]["test"] == {}, state["best"]
        # A trial resumed from a stale experiment snapshot reports this run's last epoch again
        # instead of training: it is finished for 2 epochs, not for 3.
        finished = finished_result(run_dir, 2)
        assert finished["epoch"] == 1 and finished["val_accuracy"] == logged[in_process][-1]["val_accuracy"]
        assert Path(finished["checkpoint_path"]).is_dir()
        assert finished_result(run_dir, 3) is None
        new_groups = set(ray.util.placement_group_table()) - groups_before
        if in_process:
            # No nested trainer: the trial's own (Tune) group is the only one it made.
            assert len(new_groups) == 1, new_groups
            assert outcome.path.joinpath("trials", table.loc[0, "trial"], "tensorboard").is_dir()
        else:
            # Tune's group for the trial plus Train's for its worker (more if Train restarted it).
            assert len(new_groups) >= 2, new_groups
    assert [r["epoch"] for r in logged[True]] == [r["epoch"] for r in logged[False]] == [0, 1]
    for inproc, nested in zip(logged[True], logged[False], strict=True):
        # Same seed, same data order, same DeepSpeed config: the same training, up to float noise.
        assert inproc["train_loss"] == pytest.approx(nested["train_loss"], rel=1e-4)
        assert inproc["val_accuracy"] == pytest.approx(nested["val_accuracy"], abs=1e-6)
        assert inproc["val_loss"] == pytest.approx(nested["val_loss"], rel=1e-4)
