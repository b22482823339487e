"""The shipped manifests: every overlay builds, validates against its schema and meets policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.k8s.policy import check_objects

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAY_NAMES = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())

EXPECTED_OVERLAYS = {"local-cpu", "gpu-multinode", "autoscaling", "ha"}


def test_overlays_are_the_documented_set_each_with_a_readme():
    assert set(OVERLAY_NAMES) == EXPECTED_OVERLAYS
    for name in OVERLAY_NAMES:
        assert (K8S / "overlays" / name / "README.md").is_file(), f"{name} has no README.md"


def test_overlay_builds_and_validates(overlay, validate):
    name, objects = overlay
    kinds = sorted(o["kind"] for o in objects)
    for required in ("Namespace", "NetworkPolicy", "PersistentVolumeClaim", "RayCluster", "Role"):
        assert required in kinds, f"{name}: no {required} in the build"
    for obj in objects:
        validate(obj)


def test_overlay_meets_policy(overlay):
    name, objects = overlay
    problems = check_objects(objects, require_network_policy=True)
    assert not problems, f"{name}:\n" + "\n".join(map(str, problems))


def test_every_object_lands_in_the_stoker_namespace(overlay):
    name, objects = overlay
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "stoker", f"{name}: {obj['kind']}"


def test_overlay_specific_features(overlay):
    name, objects = overlay
    cluster = next(o for o in objects if o["kind"] == "RayCluster")["spec"]
    group = cluster["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    if name == "local-cpu":
        assert "nvidia.com/gpu" not in limits
        pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    else:
        assert int(limits["nvidia.com/gpu"]) >= 1
    if name == "gpu-multinode":
        assert group["replicas"] >= 2 and int(limits["nvidia.com/gpu"]) == 8
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert group["template"]["spec"]["nodeSelector"]
    if name == "autoscaling":
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["autoscalerOptions"]["version"] == "v2"
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"]
    else:
        assert not cluster.get("enableInTreeAutoscaling")
    if name == "ha":
        password = cluster["gcsFaultToleranceOptions"]["redisPassword"]
        assert "secretKeyRef" in password["valueFrom"] and "value" not in password
    else:
        assert "gcsFaultToleranceOptions" not in cluster


def test_components_compose_on_any_overlay(build, tmp_path, validate):
    """gpu-multinode + autoscaling + ha in one user overlay still builds and passes policy."""
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731 - kustomize refuses absolute paths
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [rel(K8S / "overlays" / "gpu-multinode")],
                "components": [rel(K8S / "components" / c) for c in ("autoscaling", "ha")],
            }
        )
    )
    objects = build(tmp_path)
    cluster = next(o for o in objects if o["kind"] == "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] and cluster["spec"]["gcsFaultToleranceOptions"]
    for obj in objects:
        validate(obj)
    assert not check_objects(objects, require_network_policy=True)


def test_samples_validate_and_meet_policy(samples, validate):
    assert {name.split(".")[1] for name, _ in samples} >= {"train", "tune"}
    for name, objects in samples:
        kind, feature, ext = name.split(".")
        assert ext == "yaml" and feature, name
        assert kind in {o["kind"].lower() for o in objects}, f"{name}: no {kind} object"
        for obj in objects:
            validate(obj)
        problems = check_objects(objects)
        assert not problems, f"{name}:\n" + "\n".join(map(str, problems))


def test_token_auth_exists_in_the_v1_7_crd_schema(kuberay_crds):
    crd = yaml.safe_load((kuberay_crds / "ray.io_rayclusters.yaml").read_text())
    spec = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    auth = spec["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["authOptions"]
    assert "token" in auth["properties"]["mode"]["enum"]


def test_operator_values_are_pinned_and_restricted():
    values = yaml.safe_load((K8S / "operator" / "values.yaml").read_text())
    assert values["image"]["tag"] == "v1.7.0"
    # Check the operator pod the chart renders from these values with the same rules.
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "kuberay-operator"},
        "spec": {
            "template": {
                "spec": {
                    "securityContext": values["podSecurityContext"],
                    "containers": [
                        {
                            "name": "kuberay-operator",
                            "image": f"{values['image']['repository']}:{values['image']['tag']}",
                            "securityContext": values["securityContext"],
                            "resources": values["resources"],
                        }
                    ],
                }
            }
        },
    }
    problems = check_objects([deployment])
    assert not problems, "\n".join(map(str, problems))
    assert values["watchNamespace"] == ["stoker"] and values["singleNamespaceInstall"] is True
    # Rendered RayJobs carry deletionRules: without this gate KubeRay marks them ValidationFailed.
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    assert gates["RayJobDeletionPolicy"] is True


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_every_yaml_file_parses(path):
    assert list(yaml.safe_load_all(path.read_text())) is not None


def test_the_guide_documents_queueing_cleanup_metrics_and_the_crds():
    from stoker.cluster.k8s.profiles import METRICS_PORTS, MONITORING_NAMESPACE
    from stoker.cluster.k8s.render import MAX_RAYJOB_NAME, QUEUE_LABEL

    guide = (REPO / "docs" / "kubernetes.md").read_text()
    policy = (K8S / "base" / "networkpolicy.yaml").read_text()
    label = f"{MONITORING_NAMESPACE[0]}={MONITORING_NAMESPACE[1]}"
    assert label in guide and f'{MONITORING_NAMESPACE[0]}: "{MONITORING_NAMESPACE[1]}"' in policy
    for port in METRICS_PORTS:
        assert str(port) in guide and f"port: {port}" in policy
    for text in ("--queue", "--keep-failed-cluster", "--keep-finished-job", QUEUE_LABEL,
                 "deletionRules", "RayJobDeletionPolicy", f"{MAX_RAYJOB_NAME} characters",
                 "STOKER_KUBERAY_CRDS", "STOKER_KUBERAY_CRDS_REQUIRED"):
        assert text in guide, text


def test_every_cel_rule_of_the_crds_is_evaluated(kuberay_crds, cel):
    """validate() checks the CRDs' x-kubernetes-validations too; none may be an unknown shape."""
    rules = []

    def collect(node):
        if isinstance(node, dict):
            rules.extend(r["rule"] for r in node.get("x-kubernetes-validations") or [])
            for child in node.values():
                collect(child)
        elif isinstance(node, list):
            for child in node:
                collect(child)

    for path in sorted(kuberay_crds.glob("ray.io_*.yaml")):
        collect(yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    assert len(rules) >= 4
    for rule in rules:
        cel(rule, {})  # raises on a shape the evaluator does not know
    assert cel("has(self.jobStatus) || has(self.jobDeploymentStatus)", {"jobStatus": "FAILED"})
    assert not cel("!(has(self.jobStatus) && has(self.jobDeploymentStatus))",
                   {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"})
    assert not cel("self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']", "other")


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"deletionRules": [{"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}]},
         "JobStatus and JobDeploymentStatus cannot be used together"),
        ({"deletionRules": [{"policy": "DeleteSelf", "condition": {"ttlSeconds": 5}}]},
         "requires either the JobStatus or the JobDeploymentStatus"),
        ({"onSuccess": {"policy": "DeleteCluster"}}, "requires either BOTH onSuccess and onFailure"),
    ],
)
def test_crd_cel_rules_refuse_a_broken_deletion_strategy(samples, validate, strategy, message):
    job = next(o for name, objects in samples if name == "rayjob.train.yaml" for o in objects if o["kind"] == "RayJob")
    validate(job)
    job["spec"]["deletionStrategy"] = strategy
    with pytest.raises(AssertionError, match=message):
        validate(job)
