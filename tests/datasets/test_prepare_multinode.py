"""`engine: ray` preparation on a real two-node Ray cluster (two `ray start` processes on this
machine, the suite's `two_node_cluster`): its tasks run on both nodes, and it writes the local
engine's shards and manifest."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests
import yaml

from stoker.datasets.config import DataConfig
from stoker.datasets.prepare import prepare

pytestmark = pytest.mark.slow


def test_ray_engine_runs_on_both_nodes_and_matches_local(two_node_cluster, tmp_path):
    rng = np.random.default_rng(11)
    for i in range(6):
        frame = pd.DataFrame({
            "x": rng.normal(size=400), "y": rng.integers(0, 5, 400).astype(float),
            "colour": rng.choice(["red", "green", "blue"], 400), "target": rng.choice(["a", "b", "c"], 400),
        })
        frame.loc[rng.random(400) < 0.05, "x"] = np.nan
        frame.to_csv(tmp_path / f"part-{i}.csv", index=False)
    data = {"source": str(tmp_path / "part-*.csv"), "label": "target", "missing": "median", "duplicates": "drop",
            "rows_per_shard": 250}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "mn-data", "data": {**data, "engine": "ray",
                                                                  "output": str(tmp_path / "ray")}}))
    # The suite's two-node cluster (tests/conftest.py), token auth on.
    cluster = two_node_cluster
    env = {**cluster.env(), "RAY_ADDRESS": cluster.gcs_address}
    result = subprocess.run([sys.executable, "-m", "stoker", "data", "prepare", str(config)],
                            capture_output=True, text=True, env=env, timeout=600, cwd=os.getcwd())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    tasks = requests.get(f"{cluster.address}/api/v0/tasks?detail=1&limit=10000", headers=cluster.headers(),
                         timeout=30).json()
    ran = {(t["func_or_class_name"], t["node_id"]) for t in tasks["data"]["result"]["result"]}
    nodes = {n["node_id"] for n in cluster.nodes()}
    assert len(nodes) == 2
    for name in ("_per_file", "_transform"):
        assert {node for task, node in ran if task.endswith(name)} == nodes, (name, ran)

    local = prepare(DataConfig(**data, output=str(tmp_path / "local")))
    written = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert written == json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert len(local.splits["train"]["files"]) > 3
    for info in local.splits.values():
        for name in info["files"]:
            assert pq.read_table(tmp_path / "ray" / name).equals(pq.read_table(tmp_path / "local" / name)), name
