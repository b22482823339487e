"""`stoker k8s ...` as a user runs it: render from a run config, errors as one line, exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stoker.cluster.k8s.policy import check_objects

REPO = Path(__file__).resolve().parents[2]


def stoker(*args, env=None):
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env=env)


@pytest.mark.parametrize("overlay", ["local-cpu", "gpu-multinode"])
def test_render_the_demo_config(overlay, validate):
    result = stoker("k8s", "render", "examples/digits.yaml", "--overlay", overlay, "--storage", "/mnt/shared/runs")
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects] == ["ConfigMap", "RayJob"]
    config_map, rayjob = objects
    carried = yaml.safe_load(config_map["data"]["run.yaml"])
    assert carried["storage"] == "/mnt/shared/runs" and carried["name"] == "digits-demo"
    assert rayjob["metadata"]["name"] == "digits-demo"
    assert rayjob["spec"]["entrypoint"] == "stoker train /config/run.yaml"
    assert check_objects(objects) == []
    validate(rayjob)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--overlay", "local-cpu"], "stoker: error: storage: 'runs' is not on the shared volume"),
        (["--overlay", "nope", "--storage", "/mnt/shared/r"],
         "stoker: error: overlay: unknown overlay 'nope'; known: autoscaling, gpu-multinode, ha, local-cpu"),
    ],
    ids=["local-storage", "unknown-overlay"],
)
def test_render_refuses_with_one_line(args, expected):
    result = stoker("k8s", "render", "examples/digits.yaml", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_status_without_kubeconfig_says_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}
    result = stoker("k8s", "status", "digits-demo", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("stoker: error: kubeconfig: no usable kubeconfig at")
