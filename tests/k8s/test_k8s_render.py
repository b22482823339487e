"""render_rayjob: valid, policy-clean RayJobs sized from the run config; clear errors otherwise."""

from __future__ import annotations

import copy
import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml

from stoker.cluster.k8s import sizing
from stoker.cluster.k8s.profiles import OVERLAYS, STOKER_IMAGE
from stoker.cluster.k8s.render import (
    QUEUE_LABEL,
    K8sConfigError,
    rayjob_name,
    rayjob_name_note,
    render_rayjob,
)
from stoker.config import parse_config
from stoker.errors import UserError
from tests.k8s.policy import check_objects

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
    # The renderer takes the validated run, as `stoker k8s render` passes it.
    return render_rayjob(parse_config(cfg or config(), "run.yaml"), CONFIG_TEXT, overlay, run_name, **options)


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
    problems = check_objects(objects)
    assert not problems, "\n".join(map(str, problems))
    for obj in objects:  # last: skips without the KubeRay CRDs
        validate(obj)


def test_rayjob_runs_the_config_from_the_configmap_and_cleans_up():
    config_map, job = render()
    assert config_map["data"]["run.yaml"] == CONFIG_TEXT
    spec = job["spec"]
    assert spec["entrypoint"] == "stoker train /config/run.yaml"
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
    assert deletion_plan(job) == {
        ("jobStatus", "SUCCEEDED"): {"DeleteCluster": 0, "DeleteSelf": 86400},
        ("jobStatus", "FAILED"): {"DeleteCluster": 3600, "DeleteSelf": 86400},
        ("jobDeploymentStatus", "Failed"): {"DeleteCluster": 3600, "DeleteSelf": 86400},
    }
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = next(v for v in head["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == "/config" and mount["readOnly"]


def test_tune_section_switches_the_entrypoint_and_sizes_for_concurrent_trials():
    cfg = config(num_workers=2, use_gpu=True)
    cfg["tune"] = {"space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}},
                   "num_samples": 16, "max_concurrent_trials": 3}
    job = render(cfg, "gpu-multinode")[1]
    assert job["spec"]["entrypoint"] == "stoker tune /config/run.yaml"
    assert int(limits(workers([None, job]))["nvidia.com/gpu"]) == 6  # 3 trials x 2 workers


def test_options_override_deadlines():
    spec = render(backoff_limit=0, active_deadline_seconds=60)[1]["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (0, 60)
    with pytest.raises(K8sConfigError, match=r"^active_deadline_seconds: "):
        render(active_deadline_seconds=0)


def deletion_plan(job: dict) -> dict:
    """{(condition field, value): {policy: ttlSeconds}} from a RayJob's deletion rules."""
    plan: dict = {}
    for rule in job["spec"]["deletionStrategy"]["deletionRules"]:
        (key, value), = ((k, v) for k, v in rule["condition"].items() if k != "ttlSeconds")
        plan.setdefault((key, value), {})[rule["policy"]] = rule["condition"]["ttlSeconds"]
    return plan


def test_deletion_rules_replace_shutdown_after_job_finishes():
    """KubeRay 1.7 refuses deletionRules next to shutdownAfterJobFinishes: true or a TTL."""
    spec = render()[1]["spec"]
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    assert "suspend" not in spec and set(spec["deletionStrategy"]) == {"deletionRules"}


@pytest.mark.parametrize(
    ("keep_failed", "keep_finished", "failed_plan", "succeeded_plan"),
    [
        (0, 0, {"DeleteCluster": 0, "DeleteSelf": 0}, {"DeleteCluster": 0, "DeleteSelf": 0}),
        (600, 7200, {"DeleteCluster": 600, "DeleteSelf": 7200}, {"DeleteCluster": 0, "DeleteSelf": 7200}),
        # A failed job's RayJob never goes before its cluster (KubeRay needs Cluster <= Self).
        (7200, 60, {"DeleteCluster": 7200, "DeleteSelf": 7200}, {"DeleteCluster": 0, "DeleteSelf": 60}),
    ],
)
def test_keep_times_are_configurable(keep_failed, keep_finished, failed_plan, succeeded_plan, validate):
    objects = render(keep_failed_cluster_s=keep_failed, keep_finished_job_s=keep_finished)
    plan = deletion_plan(objects[1])
    assert plan[("jobStatus", "FAILED")] == plan[("jobDeploymentStatus", "Failed")] == failed_plan
    assert plan[("jobStatus", "SUCCEEDED")] == succeeded_plan
    assert check_objects(objects) == []
    validate(objects[1])


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"keep_failed_cluster_s": -1}, r"^keep_failed_cluster_s: must be an integer 0\.\.2147483647 \(seconds\), got -1$"),
        ({"keep_finished_job_s": 2**31}, r"^keep_finished_job_s: must be an integer 0\.\.2147483647"),
        ({"keep_finished_job_s": "1h"}, r"^keep_finished_job_s: must be an integer"),
        ({"queue": "q", "keep_failed_cluster_s": 600}, r"^keep_failed_cluster_s: 600 cannot be kept with a queue: Kueue"),
        ({"queue": "q", "keep_finished_job_s": 600}, r"^keep_finished_job_s: not with a queue: Kueue requires shutdownAfterJobFinishes"),
    ],
)
def test_bad_keep_times_name_the_option(options, pattern):
    with pytest.raises(K8sConfigError, match=pattern) as caught:
        render(**options)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("overlay", [n for n, o in sorted(OVERLAYS.items()) if o.autoscaler is None])
def test_queued_job_is_labelled_suspended_and_shut_down_at_once(overlay, validate):
    objects = render(config(use_gpu=bool(OVERLAYS[overlay].worker.gpus)), overlay, queue="team-gpu.a100")
    job = objects[1]
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-gpu.a100"
    assert "kueue.x-k8s.io/queue-name" not in objects[0]["metadata"]["labels"]  # only the job queues
    spec = job["spec"]
    # Kueue's webhook requires shutdownAfterJobFinishes, which excludes deletion rules.
    assert (spec["suspend"], spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"]) == (True, True, 0)
    assert "deletionStrategy" not in spec
    assert check_objects(objects) == []
    validate(job)


def test_queue_refuses_an_autoscaling_overlay():
    with pytest.raises(K8sConfigError, match=r"^queue: overlay 'autoscaling' runs the Ray autoscaler, which Kueue refuses"):
        render(config(use_gpu=True), "autoscaling", queue="q")


@pytest.mark.parametrize("queue", ["Team-GPU", "team_gpu", "-team", "team.", "a/b", "", "q" * 64, "ä"])
def test_invalid_queue_names_are_refused(queue):
    with pytest.raises(K8sConfigError, match=r"^queue: .* is not a valid Kueue queue name: it must be a label value") as caught:
        render(queue=queue)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("queue", ["q", "team-gpu", "a.b-c", "0" * 63])
def test_valid_queue_names_render(queue):
    assert render(queue=queue)[1]["metadata"]["labels"][QUEUE_LABEL] == queue


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


DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


@pytest.mark.parametrize("run_name", ["r" * 47, "r" * 48, "Sweep " * 30])
def test_every_name_derived_from_a_long_run_name_fits_its_limit(run_name):
    """KubeRay names the cluster <job>-xxxxx and its head Service <cluster>-head-svc; Kueue's
    Workload is rayjob-<job>-xxxxx. All must stay DNS-1123 labels (63); labels <= 63 too."""
    config_map, job = render(run_name=run_name)
    name = job["metadata"]["name"]
    assert len(name) <= 47
    for derived in (f"{name}-abcde", f"{name}-abcde-head-svc", f"rayjob-{name}-abcde", config_map["metadata"]["name"]):
        assert len(derived) <= 63 and DNS_1123_LABEL.fullmatch(derived), derived
    assert len(f"{name}-abcde") <= 53  # KubeRay's RayCluster name limit
    pod_labels = [
        job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"],
        job["spec"]["submitterPodTemplate"]["metadata"]["labels"],
        job["metadata"]["labels"],
        config_map["metadata"]["labels"],
    ]
    for labels in pod_labels:
        for value in labels.values():
            assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value
    assert job["metadata"]["annotations"]["stoker.io/run-name"] == run_name  # the original, for people


def test_name_notes_say_why_the_rayjob_is_named_differently():
    assert rayjob_name_note("digits-demo") == ""
    assert rayjob_name_note("r" * 47) == ""
    long = rayjob_name_note("r" * 48)
    assert long.startswith("run name 'rrr") and "is 48 characters, over KubeRay's 47-character RayJob name limit" in long
    assert "kueue issue 13413" in long and long.endswith(f"RayJob '{rayjob_name('r' * 48)}'")
    assert "not a DNS-1035 label" in rayjob_name_note("My_Run")
    assert "\n" not in long


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
        ("local-cpu", {**config(), "storage": "runs"}, r"^storage: 'runs' is not on the shared volume"),
    ],
)
def test_bad_input_names_the_key(overlay, cfg, pattern):
    with pytest.raises(K8sConfigError, match=pattern) as caught:
        render(cfg, overlay)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_scaling_value_the_run_config_refuses_never_reaches_the_renderer():
    # The renderer sizes pods from the typed run: a value the type refuses (it once checked
    # num_workers itself) is refused where the config is read, naming the key and the file.
    with pytest.raises(UserError, match=r"^scaling\.num_workers: .*1, got 0 \(run\.yaml\)$"):
        render(config(num_workers=0))


def test_bad_run_name_and_config_text():
    with pytest.raises(K8sConfigError, match=r"^run_name: "):
        rayjob_name("---")
    with pytest.raises(K8sConfigError, match=r"^config_text: "):
        render_rayjob(parse_config(config(), "run.yaml"), "  ", "local-cpu", "x")


def test_object_store_uri_storage_is_accepted():
    assert render({**config(), "storage": "s3://bucket/runs"})


@pytest.mark.parametrize("sample", ["rayjob.train.yaml", "rayjob.tune.yaml", "rayjob.kueue.yaml"])
def test_rendered_samples_are_current(sample):
    """The samples are render_rayjob output; re-render from their embedded config and compare."""
    shipped = [o for o in yaml.safe_load_all((K8S / "samples" / sample).read_text()) if o]
    config_map, job = shipped
    text = config_map["data"]["run.yaml"]
    again = render_rayjob(
        parse_config(yaml.safe_load(text), sample),
        text,
        job["metadata"]["labels"]["stoker.io/overlay"],
        job["metadata"]["annotations"]["stoker.io/run-name"],
        queue=job["metadata"]["labels"].get(QUEUE_LABEL),
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
