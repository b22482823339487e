"""The policy checker: each rule fires on a deliberately broken object and names the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from stoker.cluster.k8s.render import render_rayjob
from stoker.config import parse_config
from tests.k8s.policy import Violation, check_objects

# The renderer takes a validated run; its data section is not read for a RayJob.
DATA = {"source": "/mnt/shared/data/digits.csv", "label": "target", "output": "/mnt/shared/prepared/digits"}
K8S = Path(__file__).resolve().parents[2] / "k8s"
HEAD = "spec.rayClusterSpec.headGroupSpec"
HEAD_POD = f"{HEAD}.template.spec"
HEAD_CTR = f"{HEAD_POD}.containers[0]"
WORKER = "spec.rayClusterSpec.workerGroupSpecs[0]"
WORKER_POD = f"{WORKER}.template.spec"


def good_job(overlay: str = "ha") -> dict:
    cfg = parse_config({"name": "x", "storage": "/mnt/shared/runs", "data": DATA,
                        "scaling": {"num_workers": 2, "use_gpu": True}}, "run.yaml")
    return render_rayjob(cfg, "name: x\n", overlay, "policy-test")[1]


def _parts(dotted: str) -> list:
    return [int(p) if p.isdigit() else p for p in dotted.replace("]", "").replace("[", ".").split(".")]


def at(obj: dict, dotted: str):
    """Resolve 'a.b[0].c' in obj (for the mutations below)."""
    node = obj
    for part in _parts(dotted):
        node = node[part]
    return node


def set_(dotted: str, value):
    def mutate(obj):
        *parent, key = _parts(dotted)
        node = obj
        for part in parent:
            node = node[part]
        node[key] = value

    return mutate


def delete(dotted: str):
    def mutate(obj):
        *parent, key = _parts(dotted)
        node = obj
        for part in parent:
            node = node[part]
        node.pop(key)

    return mutate


def both(*mutations):
    def mutate(obj):
        for m in mutations:
            m(obj)

    return mutate


CASES = [
    # (id, mutation, field the violation must name, rule). The generic Pod Security, image and
    # resource rules are Checkov's (test_k8s_checkov.py breaks each of them once).
    ("host-path", set_(f"{WORKER_POD}.volumes[1]", {"name": "shared", "hostPath": {"path": "/data"}}),
     f"{WORKER_POD}.volumes[1].hostPath", "pss-restricted"),
    ("requests-below-limits", set_(f"{HEAD_CTR}.resources.requests.cpu", "500m"),
     f"{HEAD_CTR}.resources.requests.cpu", "guaranteed-resources"),
    ("no-shm", set_(f"{HEAD_CTR}.volumeMounts", [{"name": "shared", "mountPath": "/mnt/shared"}]),
     f"{HEAD_CTR}.volumeMounts", "shm-sizing"),
    ("shm-on-disk", set_(f"{HEAD_POD}.volumes[0].emptyDir", {"sizeLimit": "2457Mi"}),
     f"{HEAD_POD}.volumes[0].emptyDir.medium", "shm-sizing"),
    ("shm-wrong-size", set_(f"{HEAD_POD}.volumes[0].emptyDir.sizeLimit", "4Gi"),
     f"{HEAD_POD}.volumes[0].emptyDir.sizeLimit", "shm-sizing"),
    ("object-store-too-big", set_(f"{WORKER}.rayStartParams.object-store-memory", str(64 * 2**30)),
     f"{WORKER}.rayStartParams.object-store-memory", "shm-sizing"),
    ("no-object-store", delete(f"{HEAD}.rayStartParams.object-store-memory"),
     f"{HEAD}.rayStartParams.object-store-memory", "shm-sizing"),
    ("auth-off", delete("spec.rayClusterSpec.authOptions"), "spec.rayClusterSpec.authOptions.mode", "token-auth"),
    ("old-ray", set_("spec.rayClusterSpec.rayVersion", "2.40.0"), "spec.rayClusterSpec.rayVersion", "ray-version"),
    ("inline-env-secret", set_(f"{WORKER_POD}.containers[0].env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]),
     f"{WORKER_POD}.containers[0].env[0].value", "no-inline-secrets"),
    ("inline-redis-password", set_("spec.rayClusterSpec.gcsFaultToleranceOptions.redisPassword", {"value": "hunter2"}),
     "spec.rayClusterSpec.gcsFaultToleranceOptions.redisPassword.value", "no-inline-secrets"),
    ("redis-password-param", set_(f"{HEAD}.rayStartParams.redis-password", "hunter2"),
     f"{HEAD}.rayStartParams.redis-password", "no-inline-secrets"),
    ("load-balancer", set_(f"{HEAD}.serviceType", "LoadBalancer"), f"{HEAD}.serviceType", "dashboard-exposure"),
    ("ingress", set_(f"{HEAD}.enableIngress", True), f"{HEAD}.enableIngress", "dashboard-exposure"),
    ("head-runs-work", set_(f"{HEAD}.rayStartParams.num-cpus", "4"), f"{HEAD}.rayStartParams.num-cpus", "cpu-only-head"),
    ("default-submitter", delete("spec.submitterPodTemplate"), "spec.submitterPodTemplate", "pss-restricted"),
    ("no-replica-bounds", delete(f"{WORKER}.minReplicas"), f"{WORKER}.minReplicas", "kuberay"),
    ("long-name", set_("metadata.name", "x" * 48), "metadata.name", "kuberay"),
]


def _drop_key(dotted_parent: str, key: str):
    def mutate(obj):
        at(obj, dotted_parent).pop(key)

    return mutate


def _put_key(dotted_parent: str, key: str, value):
    def mutate(obj):
        at(obj, dotted_parent)[key] = value

    return mutate


# Label and resource keys contain dots, which the dotted helper cannot address.
CASES += [
    ("gpu-request-mismatch",
     _put_key(f"{WORKER_POD}.containers[0].resources.requests", "nvidia.com/gpu", "2"),
     f"{WORKER_POD}.containers[0].resources.requests.nvidia.com/gpu", "guaranteed-resources"),
    ("unlabelled-pod",
     _drop_key(f"{WORKER}.template.metadata.labels", "app.kubernetes.io/part-of"),
     f"{WORKER}.template.metadata.labels.app.kubernetes.io/part-of", "network-policy"),
]


RULES = "spec.deletionStrategy.deletionRules"
QUEUE = "kueue.x-k8s.io/queue-name"


def _drop_rules(*indexes):
    def mutate(obj):
        rules = obj["spec"]["deletionStrategy"]["deletionRules"]
        obj["spec"]["deletionStrategy"]["deletionRules"] = [r for i, r in enumerate(rules) if i not in indexes]

    return mutate


# KubeRay 1.7's RayJob cross-field rules (ValidateRayJobSpec), clean-up and Kueue.
CASES += [
    ("rules-with-shutdown", set_("spec.shutdownAfterJobFinishes", True),
     "spec.shutdownAfterJobFinishes", "kuberay"),
    ("suspend-without-shutdown", set_("spec.suspend", True), "spec.suspend", "kuberay"),
    ("ttl-without-shutdown", set_("spec.ttlSecondsAfterFinished", 600), "spec.ttlSecondsAfterFinished", "kuberay"),
    ("legacy-and-rules", set_("spec.deletionStrategy.onSuccess", {"policy": "DeleteCluster"}),
     "spec.deletionStrategy", "kuberay"),
    ("empty-strategy", set_("spec.deletionStrategy", {}), "spec.deletionStrategy", "kuberay"),
    ("two-conditions", set_(f"{RULES}[0].condition.jobDeploymentStatus", "Failed"),
     f"{RULES}[0].condition", "kuberay"),
    ("no-condition", set_(f"{RULES}[0].condition", {"ttlSeconds": 0}), f"{RULES}[0].condition", "kuberay"),
    ("self-before-cluster", set_(f"{RULES}[2].condition.ttlSeconds", 10**6),
     f"{RULES}[3].condition.ttlSeconds", "kuberay"),
    ("duplicate-rule", set_(f"{RULES}[1].policy", "DeleteCluster"), f"{RULES}[1]", "kuberay"),
    ("no-cleanup", delete("spec.deletionStrategy"), "spec.deletionStrategy", "cleanup"),
    ("deadline-failures-not-cleaned", _drop_rules(4, 5), RULES, "cleanup"),
    ("job-never-deleted", _drop_rules(1), RULES, "cleanup"),
    ("queued-without-shutdown", _put_key("metadata.labels", QUEUE, "team-gpu"),
     "spec.shutdownAfterJobFinishes", "kueue"),
    ("bad-queue-name", _put_key("metadata.labels", QUEUE, "Team_GPU"), f"metadata.labels.{QUEUE}", "kueue"),
]


def test_the_unbroken_job_is_clean():
    assert check_objects([good_job()]) == []


def queued_job(overlay: str = "ha") -> dict:
    cfg = parse_config({"name": "x", "storage": "/mnt/shared/runs", "data": DATA,
                        "scaling": {"num_workers": 2, "use_gpu": True}}, "run.yaml")
    return render_rayjob(cfg, "name: x\n", overlay, "policy-test", queue="team-gpu")[1]


def test_the_unbroken_queued_job_is_clean():
    assert check_objects([queued_job()]) == []


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (set_("spec.ttlSecondsAfterFinished", 3600), "spec.ttlSecondsAfterFinished"),
        (set_("spec.rayClusterSpec.enableInTreeAutoscaling", True), "spec.rayClusterSpec.enableInTreeAutoscaling"),
        (set_("spec.shutdownAfterJobFinishes", False), "spec.shutdownAfterJobFinishes"),
    ],
    ids=["cluster-kept-outside-quota", "autoscaling", "no-shutdown"],
)
def test_broken_queued_job_is_named_by_field(mutate, field):
    job = queued_job()
    mutate(job)
    found = check_objects([job])
    assert any(v.field == field and v.rule == "kueue" for v in found), "\n".join(map(str, found))


def test_existing_cluster_jobs_may_only_delete_themselves():
    job = yaml.safe_load((K8S / "samples" / "rayjob.existing-cluster.yaml").read_text())
    assert check_objects([job]) == []
    job["spec"]["deletionStrategy"]["deletionRules"][0]["policy"] = "DeleteCluster"
    found = {(v.field, v.rule) for v in check_objects([job])}
    assert (f"{RULES}[0].policy", "kuberay") in found


@pytest.mark.parametrize(("case", "mutate", "field", "rule"), CASES, ids=[c[0] for c in CASES])
def test_broken_object_is_named_by_field(case, mutate, field, rule):
    job = good_job()
    mutate(job)
    found = check_objects([job])
    assert any(v.field == field and v.rule == rule for v in found), (
        f"{case}: expected {rule} at {field}, got:\n" + "\n".join(map(str, found))
    )
    assert all(str(v).startswith(f"RayJob/{job['metadata']['name']}: ") for v in found)


def test_autoscaler_sidecar_must_be_restricted_too():
    job = good_job("autoscaling")
    options = job["spec"]["rayClusterSpec"]["autoscalerOptions"]
    assert check_objects([job]) == []
    base = "spec.rayClusterSpec.autoscalerOptions"
    options["resources"]["requests"]["memory"] = "64Mi"
    assert {v.field for v in check_objects([job])} == {f"{base}.resources.requests.memory"}
    del options["securityContext"]
    assert f"{base}.securityContext" in {v.field for v in check_objects([job])}
    del job["spec"]["rayClusterSpec"]["autoscalerOptions"]
    assert any(v.field == base for v in check_objects([job]))


def test_secret_with_values_and_greedy_roles_are_flagged():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis"},
              "stringData": {"password": "hunter2"}}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "r"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["*"]}]}
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "open"}}
    found = {(v.obj, v.field, v.rule) for v in check_objects([secret, role, namespace])}
    assert ("Secret/redis", "data", "no-inline-secrets") in found
    assert ("Role/r", "rules[0].resources", "rbac") in found
    assert ("Namespace/open", "metadata.labels.pod-security.kubernetes.io/enforce", "namespace") in found


def _network_policy() -> dict:
    return yaml.safe_load((K8S / "base" / "networkpolicy.yaml").read_text())


def test_network_policy_required_and_checked():
    job = good_job()
    missing = check_objects([job], require_network_policy=True)
    assert any(v.rule == "network-policy" and v.obj == "NetworkPolicy/*" for v in missing)
    assert check_objects([job, _network_policy()], require_network_policy=True) == []

    open_policy = _network_policy()
    open_policy["spec"]["ingress"][1]["from"] = [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    open_policy["spec"]["ingress"][0]["from"] = []
    found = {v.field for v in check_objects([open_policy], require_network_policy=True)}
    assert {"spec.ingress[1].from[0]", "spec.ingress[0].from"} <= found


def test_violation_reads_as_object_field_message_rule():
    v = Violation("RayJob/x", "spec.a", "pss-restricted", "must be false")
    assert str(v) == "RayJob/x: spec.a: must be false [pss-restricted]"


def test_checker_does_not_mutate_its_input():
    job = good_job()
    before = copy.deepcopy(job)
    check_objects([job], require_network_policy=True)
    assert job == before


def admits(policy: dict, *, namespace: dict, pod: dict, port: int, same_namespace: bool = False) -> bool:
    """NetworkPolicy ingress semantics for one source pod (labels) and destination port.

    A peer with a namespaceSelector matches pods in the namespaces it selects (all pods there
    unless it also has a podSelector); a peer with only a podSelector matches pods of the
    policy's own namespace. A rule without ports admits every port.
    """

    def matches(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())

    for rule in policy["spec"].get("ingress") or []:
        ports = [p["port"] for p in rule.get("ports") or []]
        if ports and port not in ports:
            continue
        for peer in rule.get("from") or []:
            if "namespaceSelector" in peer:
                in_scope = matches(peer["namespaceSelector"], namespace)
            else:
                in_scope = same_namespace
            if in_scope and matches(peer.get("podSelector") or {}, pod):
                return True
    return False


PROMETHEUS = {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/instance": "k8s"}
MONITORING = {"kubernetes.io/metadata.name": "monitoring", "stoker.io/monitoring": "true"}


@pytest.mark.parametrize(
    ("namespace", "pod", "port", "allowed"),
    [
        (MONITORING, PROMETHEUS, 8080, True),  # Ray metrics, every Ray pod
        (MONITORING, PROMETHEUS, 44217, True),  # autoscaler metrics on the head
        (MONITORING, PROMETHEUS, 44227, True),  # dashboard metrics on the head
        (MONITORING, PROMETHEUS, 8265, False),  # not the Jobs API
        (MONITORING, PROMETHEUS, 6379, False),  # not GCS
        ({"kubernetes.io/metadata.name": "monitoring"}, PROMETHEUS, 8080, False),  # namespace not labelled
        (MONITORING, {"app": "grafana"}, 8080, False),  # another pod of the labelled namespace
        ({"kubernetes.io/metadata.name": "team-a"}, {"stoker.io/dashboard-client": "true"}, 8265, False),
    ],
)
def test_network_policy_admits_prometheus_to_the_metrics_ports_only(namespace, pod, port, allowed):
    assert admits(_network_policy(), namespace=namespace, pod=pod, port=port) is allowed


def test_network_policy_still_admits_ray_pods_and_dashboard_clients():
    policy = _network_policy()
    ns = {"kubernetes.io/metadata.name": "stoker"}
    assert admits(policy, namespace=ns, pod={"app.kubernetes.io/part-of": "stoker"}, port=6379, same_namespace=True)
    assert admits(policy, namespace=ns, pod={"stoker.io/dashboard-client": "true"}, port=8265, same_namespace=True)
    assert not admits(policy, namespace=ns, pod={"stoker.io/dashboard-client": "true"}, port=8080, same_namespace=True)


def test_network_policy_metrics_rules_are_checked():
    policy = _network_policy()
    metrics = policy["spec"]["ingress"].pop()  # the scrape rule comes last
    found = {v.field: v.message for v in check_objects([policy], require_network_policy=True)}
    assert "scrape Ray's metrics ports 8080, 44217, 44227" in found["spec.ingress"]

    policy = _network_policy()
    del policy["spec"]["ingress"][2]["ports"]  # monitoring namespace on every port
    found = {(v.field, v.rule) for v in check_objects([policy], require_network_policy=True)}
    assert ("spec.ingress[2].ports", "network-policy") in found

    policy = _network_policy()
    policy["spec"]["ingress"][2]["ports"].append({"protocol": "TCP", "port": 8265})
    found = {(v.field, v.rule) for v in check_objects([policy], require_network_policy=True)}
    assert ("spec.ingress[2].from[0]", "network-policy") in found
    assert metrics["from"][0]["namespaceSelector"]["matchLabels"] == {"stoker.io/monitoring": "true"}


def test_metrics_export_port_must_be_the_scraped_one():
    job = good_job()
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["metrics-export-port"] = "9090"
    fields = {v.field for v in check_objects([job]) if v.rule == "network-policy"}
    assert f"{WORKER}.rayStartParams.metrics-export-port" in fields
