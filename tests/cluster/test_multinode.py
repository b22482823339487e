"""A real two-node Ray cluster on this machine (two `ray start` processes) with token auth on:
runs are submitted through the Jobs API, train with one worker per node (STRICT_SPREAD) on
shared storage, get the single-node metrics, and are recorded in the registry."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from stoker.cluster.registry import Registry, resolve_url
from tests.conftest import run_config

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(two_node_cluster):
    # The suite's two-node cluster (tests/conftest.py); tests/datasets/test_prepare_multinode.py
    # runs tasks on it too, but no training and no job.
    return two_node_cluster


@pytest.fixture(scope="module")
def project(digits_csv, tmp_path_factory):
    """A user's project: a git repo with a config and prepared data; runs go to shared storage."""
    from stoker.config import parse_config
    from stoker.datasets.prepare import prepare

    root = tmp_path_factory.mktemp("project")
    config = run_config(digits_csv, root / "prepared", tmp_path_factory.mktemp("shared") / "runs", name="mn")
    # Half of each node's CPU trains, half reads.
    config["scaling"] = {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.5, "placement_strategy": "STRICT_SPREAD"}
    config["train"]["epochs"] = 2
    # Shuffled shard files and per-epoch block order (the default): every random choice of the
    # feed is seeded from (train.seed, epoch), so the single-node run below must match exactly.
    config["data"]["rows_per_shard"] = 400
    prepare(parse_config(config, "test").data)
    (root / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "notes.txt").write_text("uploaded with the job\n")
    for command in (["init", "-q"], ["add", "."], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"]):
        subprocess.run(["git", *command], cwd=root, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    return root, config, commit


def stoker(*args, cwd, token=None, timeout=600):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_token_auth_is_enforced_and_errors_name_the_address(cluster, project):
    root, _, _ = project
    missing = stoker("submit", "run.yaml", "--address", cluster.address, cwd=root)
    assert missing.returncode == 2
    assert missing.stderr == (f"stoker: error: --address: the Ray cluster at {cluster.address} requires a "
                              "token; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH\n")
    wrong = stoker("jobs", "list", "--address", cluster.address, cwd=root, token="0" * 64)
    assert wrong.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in wrong.stderr
    unknown = stoker("jobs", "status", "no-such-job", "--address", cluster.address, cwd=root, token=cluster.token)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith(f"stoker: error: job 'no-such-job' does not exist on {cluster.address}")


def test_submitted_run_trains_one_worker_per_node_and_is_recorded(cluster, project, ray_cluster, tmp_path):
    root, config, commit = project
    result = stoker("submit", "run.yaml", "--address", cluster.address, "--follow", cwd=root, token=cluster.token)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job stoker-mn: SUCCEEDED" in result.stdout
    assert cluster.token not in result.stdout + result.stderr

    headers = cluster.headers()
    job = requests.get(f"{cluster.address}/api/jobs/stoker-mn", headers=headers, timeout=10).json()
    env_vars = job["runtime_env"]["env_vars"]
    assert not any(cluster.token in str(v) for v in env_vars.values()) and "RAY_AUTH_TOKEN" not in env_vars
    assert env_vars["STOKER_GIT_COMMIT"] == commit

    # STRICT_SPREAD: the two Ray Train workers of this job ran on the two different nodes.
    actors = requests.get(f"{cluster.address}/api/v0/actors?detail=1&limit=1000", headers=headers, timeout=10).json()
    # This module's cluster runs one training, so its Ray Train workers are this job's.
    workers = [a for a in actors["data"]["result"]["result"] if a.get("class_name", "").endswith("RayTrainWorker")]
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2
    assert {w["node_id"] for w in workers} == {n["node_id"] for n in cluster.nodes()}

    # One registry row, written by `stoker submit` and then by the job on the shared storage.
    run_dir = Path(config["storage"]) / "mn"
    registry = Registry(resolve_url(None, config["storage"]))
    [record] = registry.runs(name="mn")
    assert (record.status, record.submission_id, record.git_commit, record.address) == (
        "succeeded", "stoker-mn", commit, cluster.address)
    assert record.checkpoint and Path(record.checkpoint).is_relative_to(run_dir)
    multi = json.loads((run_dir / "final_metrics.json").read_text())

    # The same config on one node (the session's local cluster, workers packed) learns the same.
    from stoker.config import parse_config
    from stoker.trainer.run import train

    single = dict(config, name="single", storage=str(tmp_path / "runs"),
                  scaling={**config["scaling"], "placement_strategy": "PACK"})
    local = train(parse_config(single, "test"))
    # Same seed, data, CPU count and deterministic sharding (preserve_order): each rank sees the
    # same rows in the same order wherever it runs, and gloo's 2-rank sums are exact.
    assert set(local.test) == set(multi["test"])
    for key, value in multi["test"].items():
        assert local.test[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    epochs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (run_dir, local.run_dir)]
    assert [r["epoch"] for r in epochs[0]] == [r["epoch"] for r in epochs[1]] == [0, 1]
    for mine, theirs in zip(*epochs, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), (mine["epoch"], key)

    # Submitting the finished run again does not start it over.
    again = stoker("submit", "run.yaml", "--address", cluster.address, cwd=root, token=cluster.token)
    assert again.returncode == 0 and "already succeeded as job stoker-mn" in again.stdout
    listing = stoker("jobs", "list", "--json", "--address", cluster.address, cwd=root, token=cluster.token)
    assert [json.loads(line)["status"] for line in listing.stdout.splitlines()] == ["SUCCEEDED"]
