"""render_rayjob: valid, policy-clean RayJobs sized from the run config; clear errors otherwise."""

from __future__ import annotations

import copy
import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml

from stoker.cluster.k8s import sizing
from stoker.cluster.k8s.policy import check_objects
from stoker.cluster.k8s.profiles import OVERLAYS, STOKER_IMAGE
from stoker.cluster.k8s.render import K8sConfigError, rayjob_name, render_rayjob

K8S = Path(__file__).resolve().parents[2] / "k8s"

CONFIG_TEXT = """\
name: digits-demo
storage: /mnt/shared/runs
data: {source: /mnt/shared/data/digits.csv, label: target, output: /mnt/shared/prepared/digits}
scaling: {num_workers: 2}
"""


def config(**scaling) -> dict:
    cfg = yaml.safe_load(CONFIG_TEXT)
    cfg["scaling"].update(scaling)
    return cfg


def render(cfg=None, overlay="local-cpu", run_name="digits-demo", **options) -> list[dict]:
    return render_rayjob(cfg or config(), CONFIG_TEXT, overlay, run_name, **options)


def workers(objects) -> dict:
    return objects[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def limits(group) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize(
    ("overlay", "use_gpu"),
    [(name, False) for name in sorted(OVERLAYS)]
    + [(name, True) for name, o in sorted(OVERLAYS.items()) if o.worker.gpus],
)
def test_rendered_objects_validate_and_meet_policy(overlay, use_gpu, validate):
    objects = render(config(use_gpu=use_gpu, num_workers=4), overlay)
    assert [o["kind"] for o in objects] == ["ConfigMap", "RayJob"]
    for obj in objects:
        validate(obj)
    problems = check_objects(objects)
    assert not problems, "\n".join(map(str, problems))


def test_rayjob_runs_the_config_from_the_configmap_and_cleans_up():
    config_map, job = render()
    assert config_map["data"]["run.yaml"] == CONFIG_TEXT
    spec = job["spec"]
    assert spec["entrypoint"] == "stoker train /config/run.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] >= 0
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = next(v for v in head["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == "/config" and mount["readOnly"]


def test_tune_section_switches_the_entrypoint_and_sizes_for_concurrent_trials():
    cfg = config(num_workers=2, use_gpu=True)
    cfg["tune"] = {"num_samples": 16, "max_concurrent_trials": 3}
    job = render(cfg, "gpu-multinode")[1]
    assert job["spec"]["entrypoint"] == "stoker tune /config/run.yaml"
    assert int(limits(workers([None, job]))["nvidia.com/gpu"]) == 6  # 3 trials x 2 workers


def test_options_override_deadlines():
    spec = render(backoff_limit=0, active_deadline_seconds=60, ttl_seconds_after_finished=0)[1]["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (0, 60, 0)
    with pytest.raises(K8sConfigError, match=r"^active_deadline_seconds: "):
        render(active_deadline_seconds=0)


def test_name_is_stable_across_calls_so_retries_resume():
    first, second = render(run_name="Digits Demo #1"), render(run_name="Digits Demo #1")
    assert first == second
    assert first[1]["metadata"]["name"] == "digits-demo-1"
    assert first[0]["metadata"]["name"] == "digits-demo-1-config"


@pytest.mark.parametrize(
    "run_name", ["digits-demo", "My_Run.v2", "2024-sweep", "x" * 80, "a" * 60 + "-b", "ünïcode run"]
)
def test_names_are_dns_1035_and_fit_kuberay(run_name):
    name = rayjob_name(run_name)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    assert rayjob_name(run_name) == name


def test_long_names_that_share_a_prefix_do_not_collide():
    assert rayjob_name("a" * 60 + "-one") != rayjob_name("a" * 60 + "-two")


@pytest.mark.parametrize(
    ("overlay", "scaling", "replicas", "per_pod"),
    [
        ("local-cpu", {"num_workers": 2}, 1, {"cpu": "3", "memory": "4096Mi"}),
        ("local-cpu", {"num_workers": 4}, 2, {"cpu": "3", "memory": "4096Mi"}),
        ("gpu-multinode", {"num_workers": 16, "use_gpu": True}, 2, {"nvidia.com/gpu": "8", "cpu": "88"}),
        ("gpu-multinode", {"num_workers": 4, "use_gpu": True}, 1, {"nvidia.com/gpu": "4", "cpu": "44"}),
        ("gpu-multinode", {"num_workers": 4, "use_gpu": True, "gpus_per_worker": 4}, 2, {"nvidia.com/gpu": "8"}),
        ("gpu-multinode", {"num_workers": 2, "use_gpu": True, "cpus_per_worker": 10, "data_cpus": 2}, 1, {"cpu": "22"}),
        ("ha", {"num_workers": 3, "use_gpu": True, "memory_per_worker_gb": 16}, 3, {"memory": "16384Mi"}),
    ],
)
def test_workers_are_packed_into_node_sized_pods(overlay, scaling, replicas, per_pod):
    group = workers(render(config(**scaling), overlay))
    assert group["replicas"] == replicas
    assert per_pod.items() <= limits(group).items()


def test_shm_and_object_store_follow_the_memory_limit():
    group = workers(render(config(num_workers=1, use_gpu=True, memory_per_worker_gb=10), "ha"))
    spec = group["template"]["spec"]
    assert spec["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "3072Mi"}
    assert group["rayStartParams"]["object-store-memory"] == str(sizing.object_store_bytes(10240))


def test_autoscaling_overlay_lets_idle_workers_go():
    spec = render(config(num_workers=2, use_gpu=True), "autoscaling")[1]["spec"]["rayClusterSpec"]
    group = spec["workerGroupSpecs"][0]
    assert spec["enableInTreeAutoscaling"] and spec["autoscalerOptions"]["version"] == "v2"
    assert (group["minReplicas"], group["maxReplicas"]) == (0, group["replicas"])
    assert spec["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True


@pytest.mark.parametrize(
    ("overlay", "cfg", "pattern"),
    [
        ("nope", config(), r"^overlay: unknown overlay 'nope'; known: autoscaling, gpu-multinode, ha, local-cpu$"),
        ("gpu-multinode", config(use_gpu=True, gpus_per_worker=16), r"^scaling\.gpus_per_worker: 16 exceeds the 8 GPU"),
        ("ha", config(use_gpu=True, gpus_per_worker=2), r"^scaling\.gpus_per_worker: 2 exceeds the 1 GPU"),
        ("local-cpu", config(use_gpu=True), r"^scaling\.use_gpu: overlay 'local-cpu' has no GPU nodes"),
        ("local-cpu", config(memory_per_worker_gb=0.25), r"^scaling\.memory_per_worker_gb: .*too small.*/dev/shm.*object store"),
        ("local-cpu", config(memory_per_worker_gb=64), r"^scaling\.memory_per_worker_gb: .* exceeds"),
        ("local-cpu", config(cpus_per_worker=8), r"^scaling\.cpus_per_worker: "),
        ("local-cpu", config(num_workers=0), r"^scaling\.num_workers: must be an integer >= 1, got 0$"),
        ("local-cpu", {**config(), "storage": "runs"}, r"^storage: 'runs' is not on the shared volume"),
    ],
)
def test_bad_input_names_the_key(overlay, cfg, pattern):
    with pytest.raises(K8sConfigError, match=pattern) as caught:
        render(cfg, overlay)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_bad_run_name_and_config_text():
    with pytest.raises(K8sConfigError, match=r"^run_name: "):
        rayjob_name("---")
    with pytest.raises(K8sConfigError, match=r"^config_text: "):
        render_rayjob(config(), "  ", "local-cpu", "x")


def test_object_store_uri_storage_is_accepted():
    assert render({**config(), "storage": "s3://bucket/runs"})


@pytest.mark.parametrize("sample", ["rayjob.train.yaml", "rayjob.tune.yaml"])
def test_rendered_samples_are_current(sample):
    """The samples are render_rayjob output; re-render from their embedded config and compare."""
    shipped = [o for o in yaml.safe_load_all((K8S / "samples" / sample).read_text()) if o]
    config_map, job = shipped
    text = config_map["data"]["run.yaml"]
    again = render_rayjob(
        yaml.safe_load(text),
        text,
        job["metadata"]["labels"]["stoker.io/overlay"],
        job["metadata"]["annotations"]["stoker.io/run-name"],
    )
    assert again == shipped


def test_sample_run_configs_parse_with_the_run_config_models():
    config_module = pytest.importorskip("stoker.config")
    text = yaml.safe_load((K8S / "samples" / "rayjob.train.yaml").read_text().split("---", 2)[1])
    parsed = config_module.parse_config(yaml.safe_load(text["data"]["run.yaml"]), "rayjob.train.yaml")
    assert parsed.scaling.num_workers == 16


def test_default_image_is_tagged_with_the_package_version():
    # The installed distribution's version: `import stoker` can resolve to tests/stoker (a
    # namespace folder) when pytest puts tests/ on sys.path.
    assert STOKER_IMAGE == f"stoker:{importlib.metadata.version('stoker')}"


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_profiles_mirror_the_kustomize_overlays(name, build):
    """render_rayjob uses profiles.py because k8s/ is not in the wheel: keep them in step."""
    profile = OVERLAYS[name]
    built = next(o for o in build(K8S / "overlays" / name) if o["kind"] == "RayCluster")["spec"]
    # A job big enough for whole-node pods renders the overlay's own worker pod.
    per_node = profile.worker.gpus or (profile.worker.cpu - 1)
    cfg = config(num_workers=per_node, use_gpu=bool(profile.worker.gpus))
    rendered = render(cfg, name)[1]["spec"]["rayClusterSpec"]

    for key in ("rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "gcsFaultToleranceOptions"):
        assert rendered.get(key) == built.get(key), f"{name}: {key}"
    for path in (("headGroupSpec",), ("workerGroupSpecs", 0)):
        b, r = built, rendered
        for part in path:
            b, r = b[part], r[part]
        assert r["rayStartParams"] == b["rayStartParams"], f"{name}: {path} rayStartParams"
        bpod, rpod = copy.deepcopy(b["template"]["spec"]), r["template"]["spec"]
        for key in ("serviceAccountName", "automountServiceAccountToken", "securityContext", "nodeSelector", "tolerations"):
            assert rpod.get(key) == bpod.get(key), f"{name}: {path} pod {key}"
        bc, rc = bpod["containers"][0], rpod["containers"][0]
        for key in ("image", "securityContext", "env", "imagePullPolicy"):
            assert rc.get(key) == bc.get(key), f"{name}: {path} container {key}"
        for kind in ("requests", "limits"):
            want = {k: sizing.parse_quantity(v) for k, v in bc["resources"][kind].items()}
            got = {k: sizing.parse_quantity(v) for k, v in rc["resources"][kind].items()}
            assert got == want, f"{name}: {path} {kind}"
        assert rpod["volumes"][:2] == [
            {**v, "emptyDir": {**v["emptyDir"], "sizeLimit": f"{sizing.mib_of(v['emptyDir']['sizeLimit'])}Mi"}}
            if "emptyDir" in v else v
            for v in bpod["volumes"][:2]
        ], f"{name}: {path} volumes"
    group = built["workerGroupSpecs"][0]
    assert group["groupName"] == profile.worker_group
    assert group["replicas"] == profile.replicas
    assert group["maxReplicas"] == (profile.max_replicas or profile.replicas)
    assert group.get("idleTimeoutSeconds") == profile.worker_idle_timeout_s
