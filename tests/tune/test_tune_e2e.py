"""Real searches: DeepSpeed trials on Ray Train V2 inside Ray Tune, on the session's local cluster."""

import json
import os
import signal
import time

import pandas as pd
import pytest
import ray
import yaml

from stoker.config import load_config, parse_config
from stoker.tune.runner import search
from tests.conftest import write_config
from tests.tune.conftest import read_until, start_tune

pytestmark = pytest.mark.slow


def small(base, tmp_path, name, tune, epochs=2):
    # One worker per trial with a quarter CPU: two trials side by side on a 2-CPU machine.
    return dict(base, name=name, storage=str(tmp_path / "runs"),
                train={**base["train"], "epochs": epochs, "batch_size": 128, "deepspeed": {"zero_stage": 1}},
                model={"name": "mlp", "hidden": [32]},
                scaling={"num_workers": 1, "cpus_per_worker": 0.25, "data_cpus": 1}, tune=tune)


def test_asha_search_stops_bad_trials_frees_their_placement_groups_and_writes_results(ray_cluster, prepared, tmp_path):
    tune = {
        "num_samples": 4, "max_concurrent_trials": 2, "searcher": "random", "seed": 3,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 4},
        "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-5, "high": 0.05}},
        # Two good points first: whichever reaches epoch 1 first, a good value is on the rung
        # before any random trial (started when one of them ends) gets there. With one good
        # point, a bad trial that outran it set the rung's cutoff and every trial went on.
        "points_to_evaluate": [{"train.optimizer.lr": 0.01}, {"train.optimizer.lr": 0.02}],
    }
    run = parse_config(small(prepared, tmp_path, "asha", tune, epochs=3), "test")
    lines = []
    outcome = search(run, emit=lines.append, status_interval_s=5)

    table = outcome.table
    assert len(table) == 4 and set(table["status"]) <= {"completed", "stopped"}, table
    # The warm-start points run first, with exactly their values.
    assert list(table.loc[:1, "train.optimizer.lr"]) == pytest.approx([0.01, 0.02])
    assert (table["status"] == "stopped").any() and table["epochs"].sum() < 12, table
    assert any("stopped early after 1 epochs" in line for line in lines), lines
    # Stopped and finished trials released their workers: no placement group is left alive.
    live = {pg_id: pg for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
    assert not live, live

    best = table.loc[table["val_accuracy"].idxmax()]
    # The points reach 0.92 (lr 0.01) and 0.96 (lr 0.02) after 3 epochs here; a bad lr stays near 0.06.
    assert best["status"] == "completed" and best["val_accuracy"] > 0.85, table
    on_disk = pd.read_parquet(outcome.path / "results.parquet")
    assert list(on_disk["trial"]) == list(table["trial"])
    assert len(pd.read_csv(outcome.path / "results.csv")) == 4
    # best.yaml is a plain run config (no tune section) with the best trial's value.
    best_run = load_config(outcome.best_config)
    assert best_run.tune is None and best_run.name == "asha-tune-best"
    assert best_run.train.optimizer.lr == pytest.approx(best["train.optimizer.lr"])
    assert best_run.model.hidden == [32] and best_run.train.epochs == 3
    page = outcome.report.read_text()
    for image in ("metric_by_trial.png", "learning_curves.png", "parameters.png"):
        assert f'src="plots/{image}"' in page
        assert (outcome.path / "plots" / image).read_bytes()[:4] == b"\x89PNG"
    # Each trial trained in its own Train run, named by its trial id.
    assert {p.name for p in (outcome.path / "trials").iterdir() if p.is_dir()} == set(table["trial"])


def _wait_for_readable_state(experiment, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            states = list(experiment.glob("experiment_state-*.json"))
            if states and all(json.loads(p.read_text()) for p in states):
                return
        except (ValueError, OSError):
            pass
        time.sleep(0.02)


def test_killed_driver_resumes_without_rerunning_finished_trials(ray_cluster, prepared, tmp_path):
    tune = {"num_samples": 3, "max_concurrent_trials": 1, "searcher": "tpe", "seed": 0,
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-3, "high": 0.05}}}
    path = write_config(tmp_path, small(prepared, tmp_path, "killed", tune))
    driver = start_tune(path)
    try:
        seen = read_until(driver, " done after ")
        # Killed between two snapshots (below, one is then cut as a kill inside its copy would).
        _wait_for_readable_state(tmp_path / "runs" / "killed-tune")
        # SIGKILL: no chance to save anything on the way out.
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(30)
    assert any(" done after 2 epochs" in line for line in seen), "".join(seen[-30:])
    experiment = tmp_path / "runs" / "killed-tune"
    finished = next(line.split()[1] for line in seen if " done after " in line)
    before = {p.name for p in (experiment / "trials").iterdir() if p.is_dir()}
    # Tune writes each snapshot's files in place: a driver killed inside that copy leaves the
    # newest experiment state cut short, which Tune itself would not resume from (it started
    # the search over). stoker keeps the previous snapshot aside and puts it back.
    newest = max(experiment.glob("experiment_state-*.json"))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    said: list[str] = []
    outcome = search(load_config(path), resume=True, emit=said.append)
    assert any("last experiment snapshot was cut short" in line for line in said), said
    assert outcome.resumed
    table = outcome.table
    assert len(table) == 3 and set(table["status"]) == {"completed"}, table
    assert before <= set(table["trial"])
    # The finished trial was not trained again: its Train run logged each epoch exactly once.
    epochs = [json.loads(line)["epoch"] for line in (experiment / "trials" / finished / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]
    # A different search under the same name is refused.
    changed = yaml.safe_load(path.read_text())
    changed["tune"]["space"]["train.optimizer.lr"]["high"] = 0.1
    from stoker.errors import UserError

    with pytest.raises(UserError, match="^tune.space: differs"):
        search(parse_config(changed, "run.yaml"), resume=True, emit=lambda _: None)


def test_an_interrupted_search_says_so_exits_130_and_marks_unfinished_trials(ray_cluster, prepared, tmp_path):
    tune = {"num_samples": 3, "max_concurrent_trials": 1, "searcher": "random", "seed": 0,
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-3, "high": 0.05}}}
    # A trial over the shared training split takes about 0.1 s an epoch here: 40 epochs keep the
    # second trial training for seconds after the status line that triggers the Ctrl-C.
    path = write_config(tmp_path, small(prepared, tmp_path, "interrupted", tune, epochs=40))
    driver = start_tune(path, "--status-every", "1")
    try:
        # Interrupted while the second trial trains: the first finished, the second cannot.
        seen = read_until(driver, " done after ", " 1 running")
        os.kill(driver.pid, signal.SIGINT)  # Ctrl-C
        rest, _ = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(30)
    assert driver.returncode == 130, "".join(seen[-20:]) + rest[-3000:]
    assert f"search interrupted with 1 trial unfinished; continue it with: stoker tune {path} --resume" in rest
    table = pd.read_csv(tmp_path / "runs" / "interrupted-tune" / "results.csv")
    assert list(table["status"]) == ["completed", "unfinished"], table


def test_placement_group_of_a_killed_creator_is_released(ray_cluster):
    from ray.util.placement_group import placement_group

    from stoker.tune.cleanup import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:  # stands in for Train's controller, which a stopped trial takes down
        def reserve(self):
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready())
            return group.id.hex()

    # A group the driver made (as Tune does for each trial) has no creator actor: it must stay.
    driver_group = placement_group([{"CPU": 0.01}])
    ray.get(driver_group.ready())
    controller = Controller.remote()
    group = ray.get(controller.reserve.remote())
    ray.kill(controller)
    time.sleep(2)
    # Ray keeps it: the job (this driver) is still alive.
    assert ray.util.placement_group_table()[group]["state"] == "CREATED"
    assert release_orphaned_placement_groups() >= 1
    time.sleep(0.5)
    assert ray.util.placement_group_table()[group]["state"] == "REMOVED"
    assert ray.util.placement_group_table()[driver_group.id.hex()]["state"] == "CREATED"
    ray.util.remove_placement_group(driver_group)
