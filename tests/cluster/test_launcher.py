"""The Ray cluster launcher configs under cluster/launcher/ are valid for Ray's launcher and
meet stoker's requirements: GPU worker types, bounded autoscaling, shared storage, token auth."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.conftest import REPO

LAUNCHER = REPO / "cluster" / "launcher"
CONFIGS = sorted(LAUNCHER.glob("*.yaml"))
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.")


def load(path):
    return yaml.safe_load(path.read_text())


def test_there_is_one_config_per_cloud():
    assert {load(p)["provider"]["type"] for p in CONFIGS} == {"aws", "gcp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_valid_against_rays_launcher_schema(path):
    jsonschema.validate(load(path), SCHEMA)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_gpu_workers_autoscale_within_limits_and_the_head_trains_nothing(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, worker in workers.items():
        node = worker["node_config"]
        if config["provider"]["type"] == "aws":
            assert GPU_INSTANCE.match(node["InstanceType"]), name
        else:
            assert node["guestAccelerators"][0]["acceleratorCount"] >= 1, name
            assert {"onHostMaintenance": "TERMINATE"} in node["scheduling"], name  # required with GPUs
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"], name
    assert sum(w["min_workers"] for w in workers.values()) == 0  # idle clusters cost nothing
    assert 0 < config["idle_timeout_minutes"] <= 30


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_mounts_shared_storage_and_runs_with_token_auth(path):
    config = load(path)
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"mount -t (efs|nfs)\b.* /mnt/shared", setup)
    assert "-c /home/ubuntu/stoker-constraints.txt" in setup  # the tested dependency set
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in start), key
    assert "--dashboard-port=8265" in config["head_start_ray_commands"][-1]
    # The token travels as a file from the workstation, never inline.
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert not re.search(r"RAY_AUTH_TOKEN=\S", path.read_text())
    assert not re.search(r"\b[0-9a-f]{64}\b", path.read_text())
