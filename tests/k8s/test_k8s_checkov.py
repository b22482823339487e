"""Checkov's maintained Kubernetes checks over every shipped and rendered manifest.

The generic rules (Pod Security "restricted", pinned images, requests and limits, RBAC) are
Checkov's; `tests/k8s/policy.py` keeps stoker's own (KubeRay, Kueue, /dev/shm, token auth).
Checkov looks inside the pod templates of built-in kinds only, so the pods KubeRay will run
(head, worker groups, the RayJob submitter, the autoscaler sidecar in the head pod) are written
out as Pods beside the objects they come from. One Checkov run covers the lot (its start-up is
most of its time); `make install` puts Checkov in its own virtualenv, `.tools/checkov`, because
its pins would downgrade the project's boto3/botocore.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from stoker.cluster.k8s.profiles import OVERLAYS
from stoker.cluster.k8s.render import render_rayjob
from stoker.config import parse_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CHECKOV = REPO / ".tools" / "checkov" / "bin" / "checkov"
# Checks whose failure is deliberate, each with the reason; every other Checkov check must pass.
SKIPPED = {
    "CKV_K8S_8": "liveness probes: KubeRay injects the Ray head/worker probes itself",
    "CKV_K8S_9": "readiness probes: as above",
    "CKV_K8S_21": "default namespace: rendered jobs and samples name none; `stoker k8s apply --namespace` picks it",
    "CKV_K8S_15": "imagePullPolicy Always: images are pinned tags; multi-GB Ray images are pulled once per node",
    "CKV_K8S_22": "read-only root filesystem: Ray writes its session dir and spill files under /tmp/ray",
    "CKV_K8S_35": "secrets as files: Ray's GCS Redis password and S3 credentials are read from env only",
    "CKV_K8S_38": "service account token: the autoscaler sidecar needs it to scale the RayCluster",
    "CKV_K8S_40": "UID >= 10000: Ray's images run as uid 1000, which is non-root (runAsNonRoot is checked)",
    "CKV_K8S_43": "image digests: images are pinned to version tags, which the renderer checks",
}
BROKEN = "broken.yaml"


def _run(spec: dict) -> dict:
    return {"name": "x", "storage": "/mnt/shared/runs", "scaling": {"num_workers": 2, **spec},
            "data": {"source": "/mnt/shared/data/d.csv", "label": "target", "output": "/mnt/shared/prepared/d"}}


def rendered() -> dict[str, list[dict]]:
    """What `stoker k8s render` writes: each overlay, on GPUs where it has them, and queued."""
    out = {}
    for name, overlay in sorted(OVERLAYS.items()):
        cfg = parse_config(_run({"use_gpu": bool(overlay.worker.gpus)}), "run.yaml")
        out[f"render.{name}"] = render_rayjob(cfg, "name: x\n", name, f"checkov-{name}")
        if overlay.autoscaler is None:
            out[f"render.{name}.queued"] = render_rayjob(cfg, "name: x\n", name, f"q-{name}", queue="team-a")
    return out


def operator_deployment() -> dict:
    """The operator pod the KubeRay chart renders from k8s/operator/values.yaml."""
    values = yaml.safe_load((K8S / "operator" / "values.yaml").read_text())
    container = {"name": "kuberay-operator", "image": f"{values['image']['repository']}:{values['image']['tag']}",
                 "securityContext": values["securityContext"], "resources": values["resources"]}
    # Checkov's skip annotation, for this object only: KubeRay's chart runs the operator in its
    # own namespace and ships no NetworkPolicy for it; stoker's NetworkPolicy covers the Ray pods.
    skip = {"checkov.io/skip1": "CKV2_K8S_6=the operator's namespace is KubeRay's chart's, not stoker's"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "kuberay-operator", "namespace": "kuberay-system", "annotations": skip},
            "spec": {"selector": {"matchLabels": {"app": "kuberay-operator"}}, "template": {
                "metadata": {"labels": {"app": "kuberay-operator"}},
                "spec": {"securityContext": values["podSecurityContext"], "containers": [container]}}}}


def _pod(owner: dict, suffix: str, template: dict) -> dict:
    meta = owner.get("metadata") or {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{meta.get('name', 'x')}-{suffix}", "namespace": meta.get("namespace", "stoker")},
            "spec": copy.deepcopy(template.get("spec") or {})}


def _cluster_pods(owner: dict, spec: dict) -> list[dict]:
    head = spec.get("headGroupSpec") or {}
    head_pod = _pod(owner, "head", head.get("template") or {})
    options = spec.get("autoscalerOptions")
    if spec.get("enableInTreeAutoscaling") and isinstance(options, dict):
        # KubeRay adds the autoscaler as a sidecar of the head, with the head's image by default.
        image = options.get("image") or head_pod["spec"]["containers"][0].get("image")
        head_pod["spec"]["containers"].append(
            {"name": "autoscaler", "image": image, "securityContext": options.get("securityContext"),
             "resources": options.get("resources")})
    groups = [_pod(owner, g.get("groupName", str(i)), g.get("template") or {})
              for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    return [head_pod, *groups]


def pods_of(obj: dict) -> list[dict]:
    """The Pods KubeRay creates for a Ray object, as Checkov reads them; [] for other kinds."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "RayCluster":
        return _cluster_pods(obj, spec)
    if obj.get("kind") == "RayService":
        return _cluster_pods(obj, spec.get("rayClusterConfig") or {})
    if obj.get("kind") == "RayJob":
        pods = _cluster_pods(obj, spec["rayClusterSpec"]) if spec.get("rayClusterSpec") else []
        if spec.get("submitterPodTemplate"):
            pods.append(_pod(obj, "submitter", spec["submitterPodTemplate"]))
        return pods
    return []


def broken_objects() -> list[dict]:
    """A rendered worker pod with each rule the removed checker enforced broken once, and a
    greedy Role: Checkov must fail each (the checks this suite relies on are really running)."""
    job = rendered()["render.local-cpu"][1]
    pod = pods_of(job)[1]
    pod["metadata"]["name"] = "broken"
    pod["spec"].update(hostNetwork=True, hostPID=True, hostIPC=True, securityContext={})
    pod["spec"]["volumes"].append({"name": "sock", "hostPath": {"path": "/var/run/docker.sock"}})
    ctr = pod["spec"]["containers"][0]
    ctr.update(image="rayproject/ray:latest", ports=[{"containerPort": 8265, "hostPort": 8265}])
    ctr["volumeMounts"].append({"name": "sock", "mountPath": "/var/run/docker.sock"})
    ctr["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True,
                              "capabilities": {"add": ["SYS_ADMIN", "NET_RAW"]}}
    ctr["resources"] = {"requests": {"nvidia.com/gpu": "1"}}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "broken", "namespace": "stoker"},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}
    return [pod, role]


# Each rule the hand-written checker used to enforce on pods and Roles, and the Checkov check
# that enforces it now (broken_objects breaks every one of them).
COVERED = {
    "CKV_K8S_10": "cpu requests", "CKV_K8S_11": "cpu limits",
    "CKV_K8S_12": "memory requests", "CKV_K8S_13": "memory limits",
    "CKV_K8S_14": "image tag pinned, not latest", "CKV_K8S_16": "not privileged",
    "CKV_K8S_17": "no hostPID", "CKV_K8S_18": "no hostIPC", "CKV_K8S_19": "no hostNetwork",
    "CKV_K8S_20": "allowPrivilegeEscalation false", "CKV_K8S_23": "runAsNonRoot",
    "CKV_K8S_25": "no added capabilities", "CKV_K8S_26": "no hostPort",
    "CKV_K8S_27": "no docker socket", "CKV_K8S_28": "drop NET_RAW", "CKV_K8S_31": "seccomp RuntimeDefault",
    "CKV_K8S_37": "drop ALL capabilities", "CKV_K8S_39": "no CAP_SYS_ADMIN",
    "CKV_K8S_49": "no wildcard Roles",
}


@pytest.fixture(scope="module")
def checkov(tmp_path_factory, request) -> dict[str, dict[str, set[str]]]:
    """{file: {resource: failed check ids}} plus '!passed' -> resources that passed a check."""
    if not CHECKOV.is_file():
        pytest.fail(f"{CHECKOV} is missing: `make install` creates the Checkov virtualenv (.tools/checkov)")
    build = request.getfixturevalue("build")
    folder = tmp_path_factory.mktemp("checkov")
    sources = {f"overlay.{p.name}": build(p) for p in sorted((K8S / "overlays").iterdir()) if p.is_dir()}
    sources |= {f"sample.{p.stem}": [o for o in yaml.safe_load_all(p.read_text()) if o]
                for p in sorted((K8S / "samples").glob("*.yaml"))}
    sources |= rendered()
    sources["operator"] = [operator_deployment()]
    for name, objects in sources.items():
        extra = [pod for obj in objects for pod in pods_of(obj)]
        (folder / f"{name}.yaml").write_text(yaml.safe_dump_all([*objects, *extra], sort_keys=False))
    (folder / BROKEN).write_text(yaml.safe_dump_all(broken_objects(), sort_keys=False))
    done = subprocess.run(
        [str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "--output", "json", "--compact",
         "--skip-download", "--skip-check", ",".join(SKIPPED)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.stdout.startswith(("{", "[")), f"checkov failed (rc {done.returncode}):\n{done.stderr[-3000:]}"
    reports = json.loads(done.stdout)
    results = (reports[0] if isinstance(reports, list) else reports)["results"]
    failed: dict[str, dict[str, set[str]]] = {}
    for check in results["failed_checks"]:
        file = Path(check["file_path"]).name
        failed.setdefault(file, {}).setdefault(check["resource"], set()).add(check["check_id"])
    failed["!passed"] = {c["resource"]: set() for c in results["passed_checks"]}
    failed["!files"] = {name: set() for name in sources}
    return failed


def test_shipped_and_rendered_manifests_pass_checkov(checkov):
    found = [f"{file}: {resource}: {sorted(ids)}"
             for file, by_resource in checkov.items() if file not in (BROKEN, "!passed", "!files")
             for resource, ids in by_resource.items()]
    assert not found, "Checkov failures (fix the manifest, or skip the check in SKIPPED with why):\n" + "\n".join(found)


def test_checkov_reads_the_ray_pods(checkov):
    """Pods written out of the Ray objects really get checked (a Checkov that skipped them
    would pass everything)."""
    checked = set(checkov["!passed"])
    for name in ("checkov-autoscaling-head", "checkov-ha-submitter", "stoker-head"):
        assert f"Pod.stoker.{name}" in checked, sorted(checked)[:40]
    assert any(r.startswith("Deployment.") and "kuberay-operator" in r for r in checked)
    assert {"overlay.ha", "sample.rayjob.train", "render.gpu-multinode.queued"} <= set(checkov["!files"])


def test_checkov_fails_each_rule_it_took_over(checkov):
    failed = checkov.get(BROKEN, {})
    pod = failed.get("Pod.stoker.broken", set())
    role = failed.get("Role.stoker.broken", set())
    missing = sorted(set(COVERED) - pod - role)
    assert not missing, f"Checkov passed a pod that breaks: {[f'{i} ({COVERED[i]})' for i in missing]}"


def test_skipped_checks_are_not_the_ones_relied_on():
    assert not set(SKIPPED) & set(COVERED)
