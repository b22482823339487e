"""stoker.ray_internals, the one seam for Ray's and DeepSpeed's internals. Fast: no cluster.

(The version check and the Train API hook tests came from tests/tune/test_tune_layering.py.)
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ray
import ray.tune.trainable.trainable_fn_utils as tune_fn_utils
from ray.data import DataContext

from stoker import ray_internals
from stoker.cluster.k8s import profiles
from stoker.errors import UserError
from tests.conftest import REPO, write_config


def test_another_ray_stops_the_cli_with_one_line_naming_both(tmp_path):
    path = write_config(tmp_path, {"name": "x"})  # never read: the import stops first
    script = ("import importlib.metadata as metadata, sys\n"
              "real = metadata.version\n"
              "metadata.version = lambda name: '2.61.1' if name == 'ray' else real(name)\n"
              "from stoker.cli import main\n"
              f"sys.exit(main(['tune', {str(path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray 2.61.1 is installed" in lines[0], done.stderr
    assert f"written for ray {ray_internals.WRITTEN_FOR['ray']} " in lines[0]


@pytest.mark.parametrize("distribution, installed, wanted", [
    ("ray", "2.61.1", ray_internals.WRITTEN_FOR["ray"]),
    ("ray", "2.60.1", ray_internals.WRITTEN_FOR["ray"]),  # a patch release can move a private name
    ("ray", "(none)", ray_internals.WRITTEN_FOR["ray"]),
    ("deepspeed", "0.20.0", ray_internals.WRITTEN_FOR["deepspeed"] + ".*"),
    ("deepspeed", "0.1.9", ray_internals.WRITTEN_FOR["deepspeed"] + ".*"),
])
def test_another_release_is_refused_naming_both(monkeypatch, distribution, installed, wanted):
    monkeypatch.setattr(ray_internals, "_installed", lambda name: installed)
    with pytest.raises(UserError) as refused:
        ray_internals._check(distribution)
    assert str(refused.value).startswith(f"{distribution} {installed} is installed, but stoker was written for "
                                         f"{distribution} {wanted} ")
    assert f"install {distribution}=={wanted} " in str(refused.value)


@pytest.mark.parametrize("distribution, installed", [("ray", "2.60.0"), ("deepspeed", "0.19.8"), ("deepspeed", "0.19.10")])
def test_the_written_for_release_passes(monkeypatch, distribution, installed):
    monkeypatch.setattr(ray_internals, "_installed", lambda name: installed)
    assert ray_internals._check(distribution) == installed


def test_the_pins_are_the_tested_set():
    """WRITTEN_FOR admits what constraints.txt installs, and the cluster image runs that Ray."""
    pinned = dict(re.findall(r"^(ray|deepspeed)==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE))
    assert pinned["ray"] == ray_internals.WRITTEN_FOR["ray"] == profiles.RAY_VERSION
    assert pinned["deepspeed"].startswith(ray_internals.WRITTEN_FOR["deepspeed"] + ".")
    assert ray.__version__ == ray_internals.RAY


def test_importing_the_seam_loads_no_ray_and_no_deepspeed():
    """The bottom layer stays cheap: datasets/ and `stoker k8s render` (through the Ray version in
    cluster.k8s.profiles) import the seam; Ray's modules load on first use of a name."""
    script = ("import sys\nimport stoker.ray_internals, stoker.cluster.k8s.profiles\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'deepspeed', 'torch'}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("name", ray_internals.__all__)
def test_every_name_of_the_seam_resolves_on_this_ray(name):
    # A Ray that moved a private module or name fails here, one line each.
    assert getattr(ray_internals, name) is not None


def test_a_missing_private_name_fails_with_one_line_naming_it():
    with pytest.raises(RuntimeError, match=r"^ray 2\.60\.0: object has no '_mark_trial_to_checkpoint'; "
                                           r"stoker.ray_internals needs updating for this Ray$"):
        ray_internals.mark_trial_to_checkpoint(object(), None)
    with pytest.raises(RuntimeError, match=r"^ray 2\.60\.0: no module 'ray\.train\._gone'; stoker.ray_internals"):
        ray_internals._module("ray.train._gone")


def test_the_execution_index_is_checked_before_it_is_written():
    context = DataContext.get_current().copy()
    ray_internals.set_execution_index(context, 7)
    assert context._execution_idx == 7
    with pytest.raises(RuntimeError, match=r"^ray 2\.60\.0: object has no '_execution_idx'"):
        ray_internals.set_execution_index(object(), 7)


def test_the_train_api_hook_is_for_one_thread_and_one_block_only():
    original = tune_fn_utils._in_tune_session
    seen = {}

    def other_thread():
        seen["other"] = tune_fn_utils._in_tune_session is not original and tune_fn_utils._in_tune_session()

    with pytest.raises(KeyError), ray_internals.train_api_in_this_thread():
        # Inside: this thread is a Train worker; another thread gets the original answer.
        assert tune_fn_utils._in_tune_session() is False
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        raise KeyError("the loop failed")
    assert seen["other"] == original()
    # Put back even though the block raised: nothing outlives the trial.
    assert tune_fn_utils._in_tune_session is original


# ---- Environment settings -------------------------------------------------------------------

SETTERS = {
    "set_train_poll_interval": ({}, {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}),
    "use_train_v2": ({}, {"RAY_TRAIN_V2_ENABLED": "1"}),
    "quiet_tune_output": ({}, {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
                               "RAY_AIR_NEW_OUTPUT": "0"}),
    "set_trial_thread_timeout": ({"seconds": 60}, {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "60"}),
}
FIT = ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "TUNE_MAX_PENDING_TRIALS_PG")


@pytest.fixture
def clean_env(monkeypatch):
    for name in [n for _, values in SETTERS.values() for n in values] + [*FIT, "RAY_ADDRESS"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("setter", SETTERS)
def test_each_setting_is_set_and_a_users_own_value_wins(clean_env, setter):
    kwargs, expected = SETTERS[setter]
    getattr(ray_internals, setter)(**kwargs)
    assert {name: os.environ.get(name) for name in expected} == expected
    for name in expected:
        clean_env.setenv(name, "7")
    getattr(ray_internals, setter)(**kwargs)
    assert all(os.environ[name] == "7" for name in expected)


def test_the_search_settings_last_for_the_block_only(clean_env):
    with pytest.raises(KeyError), ray_internals.tune_fit_environment(max_pending_trials=8):
        assert [os.environ.get(name) for name in FIT] == ["1", "8"]
        raise KeyError("fit failed")
    assert all(name not in os.environ for name in FIT)
    with ray_internals.tune_fit_environment():
        assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ
    clean_env.setenv("TUNE_MAX_PENDING_TRIALS_PG", "2")
    clean_env.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    with ray_internals.tune_fit_environment(max_pending_trials=8):
        assert [os.environ.get(name) for name in FIT] == ["1", "2"]  # the user's limit wins
    assert [os.environ.get(name) for name in FIT] == ["0", "2"]


def test_a_jobs_api_address_is_forgotten(clean_env):
    clean_env.setenv("RAY_ADDRESS", "http://head:8265")
    ray_internals.forget_jobs_api_address()
    assert "RAY_ADDRESS" not in os.environ


def test_every_setting_is_one_this_ray_reads():
    """A Ray that renamed a setting would leave stoker setting a variable nobody reads."""
    names = [n for _, values in SETTERS.values() for n in values] + [*FIT, "RAY_ADDRESS"]
    root = Path(importlib.util.find_spec("ray").origin).parent
    sources = [path.read_text(errors="ignore") for folder in ("train", "tune", "_private")
               for path in (root / folder).rglob("*.py") if "tests" not in path.parts]
    assert [name for name in names if not any(f'"{name}"' in text for text in sources)] == []


def test_a_finished_trial_forgets_its_metrics_statistics_and_can_report_again():
    from ray.tune.experiment import Trial

    from stoker.ray_internals import forget_trial_statistics

    trial = Trial("stoker_trainable", stub=True)
    for step in range(3):
        trial.update_last_result({"score": step, "loss": 2.0 * step, "training_iteration": step + 1})
    before = len(json.dumps(trial.get_json_state()))
    assert {"score", "loss", "training_iteration"} <= set(trial.metric_analysis)
    forget_trial_statistics(trial)
    assert trial.run_metadata.metric_analysis == trial.run_metadata.metric_n_steps == {}
    assert trial.last_result["score"] == 2  # what the results need stays
    # What an experiment snapshot holds of it shrinks too (the cached JSON is not stale).
    assert len(json.dumps(trial.get_json_state())) < before
    trial.update_last_result({"score": 5, "loss": 1.0, "training_iteration": 4})  # retried after an error
    assert trial.metric_analysis["score"]["max"] == 5 and trial.metric_analysis["loss"]["last"] == 1.0
