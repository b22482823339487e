"""`stoker submit` of a config with a `tune:` section runs the search on the cluster (as
`stoker k8s render` of the same config does), on a real local Ray cluster's Jobs API; an invalid
search is refused before anything is uploaded."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

from stoker.cluster.jobs import job_verb
from stoker.cluster.local import LocalCluster
from tests.conftest import run_config

pytestmark = pytest.mark.slow


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


@pytest.fixture(scope="module")
def project(digits_csv, tmp_path_factory):
    from stoker.config import parse_config
    from stoker.datasets.prepare import prepare

    root = tmp_path_factory.mktemp("tuneproject")
    config = run_config(digits_csv, root / "prepared", tmp_path_factory.mktemp("shared") / "runs", name="searched")
    config["train"] = {**config["train"], "epochs": 1, "batch_size": 128, "deepspeed": {"zero_stage": 1}}
    config["model"] = {"name": "mlp", "hidden": [16]}
    config["scaling"] = {"num_workers": 1, "cpus_per_worker": 0.5, "data_cpus": 1}
    config["tune"] = {"num_samples": 2, "max_concurrent_trials": 1, "searcher": "random", "seed": 1,
                      "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-3, "high": 0.05}}}
    prepare(parse_config(config, "test").data)
    (root / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root, config


def stoker(*args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


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


def test_a_config_with_a_tune_section_runs_its_search_as_the_job(cluster, project):
    root, config = project
    result = stoker("submit", "run.yaml", "--address", cluster.address, "--follow", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"search searched-tune of run searched submitted job stoker-searched-tune on {cluster.address}" in result.stdout
    assert "job stoker-searched-tune: SUCCEEDED" in result.stdout
    [job] = jobs_on(cluster)
    assert job["entrypoint"] == "python -m stoker.cluster.entry" and job["metadata"]["stoker_verb"] == "tune"
    # The search ran: its experiment holds one row per trial and the best config; no plain
    # training of the run's own name happened.
    storage = Path(config["storage"])
    experiment = storage / "searched-tune"
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 2 and set(table["status"]) == {"completed"}, table
    assert yaml.safe_load((experiment / "best.yaml").read_text()).get("tune") is None
    assert not (storage / "searched").exists()
    assert json.loads((experiment / "stoker_experiment.json").read_text())

    again = stoker("submit", "run.yaml", "--address", cluster.address, cwd=root)
    assert again.returncode == 0 and "already succeeded as job stoker-searched-tune" in again.stdout
