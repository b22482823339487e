"""`stoker submit` as the README types it, against a real `ray start --head` cluster that this
module starts (its own ports and temp dir) and stops by pid: a training and a search, from a
project folder laid out as a clone (`examples/*.yaml`, `data/digits.csv`, `prepared/digits`),
with the examples' relative paths. The paths resolve in that folder, not in the job's uploaded
copy of it; the runs land in its `runs/`; the submitting side's registry ends with the run's
status and score. A config with a `tune:` section runs its search as the job (as `stoker k8s
render` of the same config does), and an invalid search is refused before anything is uploaded."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

from stoker.cluster.jobs import ENV_CONFIG, PROBE_ENV, PROBE_PREFIX, job_verb
from stoker.cluster.registry import Registry
from stoker.trainer.run_dir import FINAL
from tests.local_cluster import LocalCluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_the_job_verb_is_tune_exactly_when_the_config_has_a_tune_section():
    assert job_verb({"name": "x"}) == "train"
    assert job_verb({"name": "x", "tune": None}) == "train"
    assert job_verb({"name": "x", "tune": {"space": {"train.optimizer.lr": {"dist": "uniform", "low": 0, "high": 1}}}}) == "tune"


@pytest.fixture(scope="module")
def cluster():
    directory = Path(tempfile.mkdtemp(prefix="stksub", dir="/tmp"))  # short: Ray's sockets live here
    running = LocalCluster(directory, num_nodes=1, cpus_per_node=2).start()
    try:
        yield running
    finally:
        # After its jobs, `ray start --block` can sit out the whole default grace period; a
        # test cluster's processes are killed after a short one.
        running.stop(grace_s=5)
        shutil.rmtree(directory, ignore_errors=True)


def stoker(*args, cwd, timeout=600, env_extra=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH_TOKEN") and k not in ("RAY_ADDRESS", "STOKER_REGISTRY_URL")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A clone's layout: the examples copied from the repository with their relative paths as
    written (only made small: 1 epoch, 2 trials), and the README's data commands run in it."""
    root = tmp_path_factory.mktemp("clone")
    (root / "examples").mkdir()
    # A clone has the CLI's folder at its top: uploaded with the job, it would shadow the
    # cluster's installed stoker.
    shutil.copytree(REPO / "stoker", root / "stoker", ignore=shutil.ignore_patterns("__pycache__"))
    training = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    training["train"]["epochs"] = 1
    search = yaml.safe_load((REPO / "examples" / "tune-digits.yaml").read_text())
    search["train"]["epochs"] = 1
    search["tune"].update(num_samples=2, max_concurrent_trials=1, scheduler={"name": "fifo"}, searcher="random")
    for config in (training, search):
        assert (config["storage"], config["data"]["source"], config["data"]["output"]) == \
            ("runs", "data/digits.csv", "prepared/digits")
    (root / "examples" / "digits.yaml").write_text(yaml.safe_dump(training, sort_keys=False))
    (root / "examples" / "tune-digits.yaml").write_text(yaml.safe_dump(search, sort_keys=False))
    for command in (("data", "sample", "digits", "data/digits.csv"), ("data", "prepare", "examples/digits.yaml")):
        done = stoker(*command, cwd=root, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    return root, search


def jobs_on(cluster) -> list[dict]:
    return requests.get(f"{cluster.address}/api/jobs/", timeout=10).json()


def test_an_invalid_search_is_refused_before_anything_is_uploaded(cluster, project):
    root, config = project
    bad = dict(config, tune={**config["tune"], "space": {"model.width": {"dist": "choice", "values": [8, 16]}}})
    (root / "bad.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    refused = stoker("submit", "bad.yaml", "--address", cluster.address, cwd=root)
    assert refused.returncode == 2
    assert refused.stderr.startswith("stoker: error: tune.space.model.width: names no config field (model has: ")
    assert refused.stderr.count("\n") == 1
    out_of_range = dict(config, tune={**config["tune"], "space": {"model.dropout": {"dist": "uniform", "low": 0, "high": 1.5}}})
    (root / "range.yaml").write_text(yaml.safe_dump(out_of_range, sort_keys=False))
    refused = stoker("submit", "range.yaml", "--address", cluster.address, cwd=root)
    assert refused.returncode == 2 and refused.stderr.startswith("stoker: error: tune.space.model.dropout: value 1.5 is rejected")
    metric = dict(config, tune={**config["tune"], "metric": "val_rmse"})
    (root / "metric.yaml").write_text(yaml.safe_dump(metric, sort_keys=False))
    refused = stoker("submit", "metric.yaml", "--address", cluster.address, cwd=root)
    assert refused.returncode == 2 and "tune.metric: 'val_rmse' is never reported for classification" in refused.stderr
    assert jobs_on(cluster) == []


def test_the_readme_submit_trains_into_the_clones_runs_and_records_the_score_here(cluster, project):
    root, _ = project
    # The submitting side's registry is not the one the job writes (runs/registry.db, which it
    # sees through the shared folder), as when the cluster is another machine: what this one
    # shows after --follow, it recorded itself.
    here = root / "laptop.db"
    result = stoker("submit", "examples/digits.yaml", "--address", cluster.address, "--follow", cwd=root,
                    env_extra={"STOKER_REGISTRY_URL": f"sqlite:///{here}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job stoker-digits-demo: SUCCEEDED" in result.stdout
    [job] = [j for j in jobs_on(cluster) if j["submission_id"] == "stoker-digits-demo"]
    sent = yaml.safe_load(job["runtime_env"]["env_vars"][ENV_CONFIG])
    assert (sent["storage"], sent["data"]["output"], sent["data"]["source"]) == \
        (str(root / "runs"), str(root / "prepared" / "digits"), str(root / "data" / "digits.csv"))
    # One small job checked those paths first, and found the clone's folders.
    [probe] = [j for j in jobs_on(cluster) if j["submission_id"].startswith(PROBE_PREFIX)]
    checked = json.loads(probe["runtime_env"]["env_vars"][PROBE_ENV])
    assert probe["status"] == "SUCCEEDED" and [path for path, _ in checked] == [str(root / "runs"), str(root / "prepared" / "digits")]
    final = json.loads((root / "runs" / "digits-demo" / FINAL).read_text())
    assert sorted(p.name for p in (root / "runs" / "digits-demo").glob("checkpoint_*"))
    assert not list((root / "runs").glob(".stoker-probe-*"))

    [record] = Registry(f"sqlite:///{here}").runs()
    assert (record.name, record.status, record.submission_id, record.address) == (
        "digits-demo", "succeeded", "stoker-digits-demo", cluster.address)
    assert record.score == pytest.approx(final["validation"]["accuracy"]) and record.score > 0.5
    assert record.metric == "val_accuracy" and record.checkpoint.startswith(str(root / "runs" / "digits-demo"))
    assert record.run_dir == str(root / "runs" / "digits-demo")
    # `stoker jobs status` reads the job's world size from the run's records in the shared folder.
    status = stoker("jobs", "status", "stoker-digits-demo", "--address", cluster.address, cwd=root)
    assert status.returncode == 0, status
    first, workers = status.stdout.splitlines()
    assert first.startswith("stoker-digits-demo: SUCCEEDED") and workers == "workers: 2", status.stdout


def test_the_readme_submit_of_a_search_runs_it_into_the_clones_runs(cluster, project):
    root, config = project
    result = stoker("submit", "examples/tune-digits.yaml", "--address", cluster.address, "--follow", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"search digits-search of run digits-demo submitted job stoker-digits-search on {cluster.address}" in result.stdout
    assert "job stoker-digits-search: SUCCEEDED" in result.stdout
    [job] = [j for j in jobs_on(cluster) if j["submission_id"] == "stoker-digits-search"]
    assert job["entrypoint"] == "python -m stoker.job_entry" and job["metadata"]["stoker_verb"] == "tune"
    # The search ran in the clone's runs/: one row per trial and the best config there.
    experiment = root / "runs" / "digits-search"
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 2 and set(table["status"]) == {"completed"}, table
    assert yaml.safe_load((experiment / "best.yaml").read_text()).get("tune") is None
    assert json.loads((experiment / "stoker_experiment.json").read_text())
    # `stoker jobs status` reads the search's trials from its progress.json in the shared folder.
    progress = json.loads((experiment / "progress.json").read_text())
    assert progress["done"] + progress["stopped"] == 2 and progress["running"] == progress["errored"] == 0
    assert progress["best"] == pytest.approx(table["val_accuracy"].max())
    status = stoker("jobs", "status", "stoker-digits-search", "--address", cluster.address, cwd=root)
    first, trials = status.stdout.splitlines()
    assert first.startswith("stoker-digits-search: SUCCEEDED"), status.stdout
    assert trials.startswith("trials: ") and f"best val_accuracy {progress['best']:.4f} (trial " in trials, trials

    again = stoker("submit", "examples/tune-digits.yaml", "--address", cluster.address, cwd=root)
    assert again.returncode == 0 and "already succeeded as job stoker-digits-search" in again.stdout
