"""HyperBand's brackets survive an experiment restore (`stoker.tune.hyperband.Brackets`): a trial
paused at its rung when the driver died is compared with its own bracket's trials after
`--resume` and stopped there, instead of training on to its full budget."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tests.conftest import REPO

# A driver of its own (killed mid-search), on the session's cluster. Trial x sleeps x seconds per
# iteration and scores x. HyperBand with max_t 3 and reduction factor 3 has two brackets: x=1, 2
# train 3 iterations with no stop; x=3, 4, 5 meet at a rung after 1 iteration, where only the
# best (x=5) carries on to 3. x=3 and x=4 reach the rung seconds before x=5 and wait there.
DRIVER = r"""
import json, os, sys, tempfile, time
from pathlib import Path

from ray import tune

from stoker.cluster.connect import connect_embedded
from ray.tune.schedulers import ASHAScheduler

from stoker.tune.hyperband import HyperBandScheduler
from stoker.tune.runner import launch

experiment, restore, asha = Path(sys.argv[1]), sys.argv[2] == "restore", sys.argv[3] == "asha"


def trainable(config):
    checkpoint = tune.get_checkpoint()
    done = json.loads((Path(checkpoint.path) / "it.json").read_text()) if checkpoint else 0
    for it in range(done + 1, 4):
        time.sleep(config["x"])
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "it.json").write_text(json.dumps(it))
            # What the test reads back; before the report, after which a stopped trial's thread never runs on.
            with (experiment / "iterations.jsonl").open("a") as log:
                log.write(json.dumps({"x": config["x"], "it": it}) + "\n")
            tune.report({"score": config["x"], "it": it}, checkpoint=tune.Checkpoint.from_directory(directory))


connect_embedded()
if asha:  # one trial at a time, in this order: ASHA's decisions depend on the order results come in
    launch(trainable, path=experiment, space={"x": tune.grid_search([3, 2, 4, 1])}, metric="score", mode="max",
           num_samples=1, max_concurrent=1, restore=restore,
           scheduler=ASHAScheduler(time_attr="training_iteration", max_t=3, grace_period=1, reduction_factor=3))
else:
    launch(trainable, path=experiment, space={"x": tune.grid_search([1, 2, 3, 4, 5])}, metric="score", mode="max",
           num_samples=1, max_concurrent=5, restore=restore,
           scheduler=HyperBandScheduler(time_attr="training_iteration", max_t=3, reduction_factor=3))
"""


def _driver(experiment: Path, mode: str, scheduler: str = "hyperband") -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, RAY_AUTH_MODE="disabled",
               TUNE_GLOBAL_CHECKPOINT_S="0")  # an experiment snapshot at every step
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(experiment), mode, scheduler], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _waiting_at_rung(experiment: Path) -> list[str]:
    """Trials the newest experiment snapshot has PAUSED after their first iteration."""
    waiting = []
    for state in experiment.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):
            return []  # being written
        for trial_json, metadata_json in trials:
            trial, metadata = json.loads(trial_json), json.loads(metadata_json)
            last = json.loads(metadata["last_result"]) if isinstance(metadata.get("last_result"), str) else metadata.get("last_result") or {}
            if trial["status"] == "PAUSED" and last.get("it") == 1:
                waiting.append(trial["trial_id"])
    return waiting


def _iterations(experiment: Path) -> dict[int, int]:
    """x -> the last iteration its trial reported."""
    last: dict[int, int] = {}
    log = experiment / "iterations.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        report = json.loads(line)
        last[report["x"]] = max(last.get(report["x"], 0), report["it"])
    return last


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_trial_paused_at_its_rung_is_stopped_by_its_own_bracket_after_a_restore(ray_cluster, tmp_path):
    experiment = tmp_path / "brackets"
    driver = _driver(experiment, "start")
    try:
        deadline = time.monotonic() + 120
        while not _waiting_at_rung(experiment) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = _waiting_at_rung(experiment)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        output = driver.communicate(timeout=60)[0]
    assert waiting, f"no trial was seen waiting at its rung before the search ended:\n{output[-3000:]}"
    assert len(_iterations(experiment)) < 5 or min(_iterations(experiment).values()) < 3, "the search had ended"

    resumed = _driver(experiment, "restore")
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, output[-3000:]
    # Restored into their own bracket, x=3 and x=4 lose to x=5 at the rung (a new bracket would
    # have carried them on to 3 iterations); the other bracket trains its trials to the end.
    assert _iterations(experiment) == {1: 3, 2: 3, 3: 1, 4: 1, 5: 3}, output[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_asha_stops_the_same_trials_after_a_restore_as_without_one(ray_cluster, tmp_path):
    """Uninterrupted, ASHA (max_t 3, rung at 1, reduction factor 3) sees x=3 (trains on), then
    stops x=2 at the rung (below x=3), carries x=4 on and stops x=1. The driver dies once x=3 has
    finished; resumed with empty rungs, ASHA would carry x=2 on to 3 iterations."""
    experiment = tmp_path / "asha"
    driver = _driver(experiment, "start", "asha")
    try:
        deadline = time.monotonic() + 120
        while _iterations(experiment).get(3) != 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        output = driver.communicate(timeout=60)[0]
    assert _iterations(experiment) == {3: 3}, f"killed at the wrong moment:\n{output[-3000:]}"

    resumed = _driver(experiment, "restore", "asha")
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert _iterations(experiment) == {3: 3, 2: 1, 4: 3, 1: 1}, output[-3000:]
