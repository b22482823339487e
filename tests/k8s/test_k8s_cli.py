"""`stoker k8s ...` as a user runs it: render from a run config, errors as one line, exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.k8s.policy import check_objects

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


def test_render_queued(tmp_path, validate):
    result = stoker("k8s", "render", "examples/digits.yaml", "--overlay", "local-cpu",
                    "--storage", "/mnt/shared/runs", "--queue", "team-cpu")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rayjob = list(yaml.safe_load_all(result.stdout))[1]
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-cpu"
    assert rayjob["spec"]["suspend"] is True and rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert check_objects([rayjob]) == []
    validate(rayjob)


def test_render_keeps_a_failed_cluster_as_asked():
    result = stoker("k8s", "render", "examples/digits.yaml", "--overlay", "local-cpu", "--storage",
                    "/mnt/shared/runs", "--keep-failed-cluster", "120", "--keep-finished-job", "600")
    assert result.returncode == 0, result.stderr
    rules = list(yaml.safe_load_all(result.stdout))[1]["spec"]["deletionStrategy"]["deletionRules"]
    ttls = {(r["policy"], r["condition"].get("jobStatus") or r["condition"]["jobDeploymentStatus"]):
            r["condition"]["ttlSeconds"] for r in rules}
    assert ttls == {("DeleteCluster", "SUCCEEDED"): 0, ("DeleteSelf", "SUCCEEDED"): 600,
                    ("DeleteCluster", "FAILED"): 120, ("DeleteSelf", "FAILED"): 600,
                    ("DeleteCluster", "Failed"): 120, ("DeleteSelf", "Failed"): 600}


def test_long_run_name_is_shortened_and_said_on_stderr(tmp_path):
    config = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    config["name"] = "digits-sweep-" + "lr0.003-wd0.0001-warmup20-" * 3
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ("k8s", "render", str(path), "--overlay", "local-cpu", "--storage", "/mnt/shared/runs")
    first, second = stoker(*args), stoker(*args)
    assert first.returncode == 0, first.stderr
    name = list(yaml.safe_load_all(first.stdout))[1]["metadata"]["name"]
    assert len(name) <= 47 and name == list(yaml.safe_load_all(second.stdout))[1]["metadata"]["name"]
    assert first.stderr.count("\n") == 1
    assert first.stderr.startswith(f"stoker: note: run name {config['name']!r} is {len(config['name'])} characters, "
                                   "over KubeRay's 47-character RayJob name limit")
    assert first.stderr.rstrip().endswith(f"RayJob {name!r}")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--queue", "Team_GPU"], "stoker: error: --queue: 'Team_GPU' is not a valid Kueue queue name"),
        (["--queue", "q" * 64], "stoker: error: --queue: '" + "q" * 64 + "' is not a valid Kueue queue name"),
        (["--queue", "team", "--keep-failed-cluster", "600"],
         "stoker: error: --keep-failed-cluster: 600 cannot be kept with a queue"),
        (["--queue", "team", "--keep-finished-job", "600"], "stoker: error: --keep-finished-job: not with a queue"),
        (["--keep-failed-cluster", "1h"], "stoker: error: --keep-failed-cluster: must be a whole number of seconds >= 0, got '1h'"),
        (["--keep-finished-job", "-5"], "stoker: error: --keep-finished-job: must be a whole number of seconds >= 0, got '-5'"),
    ],
    ids=["queue-label-value", "queue-too-long", "queue-keep-failed", "queue-keep-finished", "keep-not-a-number", "keep-negative"],
)
def test_render_refuses_bad_queue_and_keep_times_with_one_line(args, expected):
    result = stoker("k8s", "render", "examples/digits.yaml", "--overlay", "local-cpu",
                    "--storage", "/mnt/shared/runs", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


def test_help_defaults_match_the_renderer():
    from stoker.cluster.k8s import render
    from stoker.commands import k8s

    assert k8s.DEFAULT_KEEP_FAILED_CLUSTER_S == render.DEFAULT_KEEP_FAILED_CLUSTER_S
    assert k8s.DEFAULT_KEEP_FINISHED_JOB_S == render.DEFAULT_KEEP_FINISHED_JOB_S


def test_render_sizes_worker_pods_from_scaling_memory_per_worker_gb(tmp_path):
    # The scaling key the renderer reads must be one the run config accepts (it once refused it).
    config = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    config["scaling"] = {**config.get("scaling", {}), "num_workers": 1, "use_gpu": True, "memory_per_worker_gb": 10}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = stoker("k8s", "render", str(path), "--overlay", "ha", "--storage", "/mnt/shared/runs")
    assert result.returncode == 0, result.stderr
    rayjob = list(yaml.safe_load_all(result.stdout))[1]
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["memory"] == "10240Mi"
