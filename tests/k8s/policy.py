"""stoker's own rules for its manifests, as a checker that names the object and field at fault.

    check_objects(objects: Iterable[dict], *, require_network_policy: bool = False)
        -> list[Violation]

A test helper, not shipped: the generic rules are Checkov's (tests/k8s/test_k8s_checkov.py
runs it over the same manifests, with the Ray pods written out as Pods): runAsNonRoot,
allowPrivilegeEscalation, privileged, capabilities (drop ALL, add none, no NET_RAW/SYS_ADMIN),
seccomp, host namespaces and ports, the Docker socket, CPU/memory requests and limits set,
pinned image tags, wildcard Roles (COVERED there lists the check ids). What stays here is what
Checkov has no check for: KubeRay's, Kueue's and Ray's rules, and a few stricter than its own.

Each `Violation` reads like `RayCluster/stoker: spec.headGroupSpec.rayStartParams.num-cpus:
must be "0" so no task or train worker lands on the head [cpu-only-head]`. The rules:

- pss-restricted: only Pod Security's allowed volume types (Checkov flags the Docker socket
  only); KubeRay's default submitter pod and autoscaler sidecar are unrestricted, so a RayJob
  sets `submitterPodTemplate` and an autoscaling cluster `autoscalerOptions.securityContext`.
- guaranteed-resources: where a request and a limit are both set they are equal (Guaranteed
  QoS); that both are set is Checkov's.
- shm-sizing: Ray containers mount a memory-backed `/dev/shm` whose sizeLimit is derived from
  the memory limit (`sizing.shm_mib`), and `object-store-memory` is set and below it.
- token-auth / ray-version: `authOptions.mode: token` on every Ray cluster (Ray >= 2.52).
- no-inline-secrets: credentials only by reference (env `valueFrom`, Secret refs).
- dashboard-exposure: head Service is ClusterIP and KubeRay's Ingress is off.
- network-policy: pods carry the label the NetworkPolicy selects and export metrics on the
  port it admits scrapes on; with `require_network_policy`, a NetworkPolicy selects them,
  admits only labelled pods, admits pods of other namespaces only on listed ports (never the
  dashboard's, except KubeRay's operator), and lets Prometheus in a namespace labelled
  `stoker.io/monitoring=true` scrape the metrics ports.
- kuberay: what the operator would reject later (replica bounds, name lengths, and the
  RayJob cross-field rules of KubeRay 1.7's ValidateRayJobSpec that no CRD schema carries:
  suspend needs shutdownAfterJobFinishes, deletionRules exclude it and the legacy
  onSuccess/onFailure, one condition per rule, TTLs DeleteWorkers <= DeleteCluster <=
  DeleteSelf). The operator marks such a RayJob ValidationFailed after the API server
  accepted it; a Kueue-queued one then holds its quota (kueue issue 13413).
- cleanup: a RayJob deletes what it leaves behind: with deletionRules, a DeleteSelf rule for
  each end (jobStatus SUCCEEDED and FAILED, jobDeploymentStatus Failed) and its own cluster
  deleted by then; otherwise shutdownAfterJobFinishes (the only way for a queued job).
- kueue: a RayJob with Kueue's queue-name label uses a valid LocalQueue name, keeps
  shutdownAfterJobFinishes with ttlSecondsAfterFinished 0 (Kueue returns the quota when the
  job ends) and no in-tree autoscaling.
- cpu-only-head: the head advertises no CPUs (`num-cpus: "0"`), so no work lands on it.
- rbac / namespace: no Secret access in Roles (Checkov flags only a binding that reads all of
  them); namespaces enforce Pod Security `restricted` (Checkov has no Namespace check).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from stoker.cluster.k8s import sizing
from stoker.cluster.k8s.profiles import (
    DASHBOARD_PORT,
    METRICS_PORT,
    METRICS_PORTS,
    MONITORING_NAMESPACE,
    PART_OF,
)
from stoker.cluster.k8s.render import MAX_LABEL_VALUE, QUEUE_LABEL, QUEUE_NAME

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SECRET_NAME = re.compile(
    r"(password|passwd|secret|token|api[_-]?key|credential|private[_-]?key)", re.I
)
# Keys whose string value names or points at a secret rather than being one.
REFERENCE_KEY = re.compile(r"(name|ref|path|file|mode|type)$", re.I)
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# The ends of a RayJob a deletion rule can match (KubeRay 1.7: exactly these three).
RAYJOB_ENDS = (("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed"))
# KubeRay requires per-condition TTLs to grow along this order (lower deletes earlier).
DELETION_ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")


@dataclass(frozen=True)
class Violation:
    obj: str
    field: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.field}: {self.message} [{self.rule}]"


def check_objects(
    objects: Iterable[dict], *, require_network_policy: bool = False
) -> list[Violation]:
    """Every rule over every object; an empty list means the set is fit to apply."""
    objects = [o for o in objects if isinstance(o, dict)]
    found: list[Violation] = []
    for obj in objects:
        found.extend(_check_object(obj))
    if require_network_policy:
        found.extend(_check_network_policies(objects))
    return found


def _check_object(obj: dict) -> Iterator[Violation]:
    kind = obj.get("kind", "?")
    ref = f"{kind}/{(obj.get('metadata') or {}).get('name', '?')}"
    spec = obj.get("spec") or {}
    yield from _inline_secrets(ref, obj)
    if kind == "RayCluster":
        yield from _ray_cluster(ref, "spec", spec)
        yield from _name_length(ref, obj, 53)
    elif kind == "RayJob":
        yield from _name_length(ref, obj, 47)
        yield from _rayjob_lifecycle(ref, obj)
        if spec.get("rayClusterSpec"):
            yield from _ray_cluster(ref, "spec.rayClusterSpec", spec["rayClusterSpec"])
        if spec.get("submitterPodTemplate"):
            yield from _pod(
                ref,
                "spec.submitterPodTemplate.spec",
                spec["submitterPodTemplate"].get("spec") or {},
            )
        elif spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            # KubeRay's default submitter pod has no security context at all.
            yield Violation(
                ref,
                "spec.submitterPodTemplate",
                "pss-restricted",
                "must be set: the default submitter pod is not restricted",
            )
    elif kind == "RayService":
        yield from _ray_cluster(ref, "spec.rayClusterConfig", spec.get("rayClusterConfig") or {})
    elif kind == "Pod":
        yield from _pod(ref, "spec", spec)
    elif kind in POD_OWNERS:
        yield from _pod(ref, "spec.template.spec", (spec.get("template") or {}).get("spec") or {})
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        yield from _pod(ref, "spec.jobTemplate.spec.template.spec", template.get("spec") or {})
    elif kind == "Secret" and (obj.get("data") or obj.get("stringData")):
        yield Violation(
            ref,
            "data",
            "no-inline-secrets",
            "Secrets with values must not be committed; create them out of band",
        )
    elif kind in ("Role", "ClusterRole"):
        yield from _rbac(ref, obj)
    elif kind == "Namespace":
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            yield Violation(
                ref,
                "metadata.labels.pod-security.kubernetes.io/enforce",
                "namespace",
                "must be 'restricted'",
            )


def _ray_cluster(ref: str, path: str, spec: dict) -> Iterator[Violation]:
    if (spec.get("authOptions") or {}).get("mode") != "token":
        yield Violation(
            ref,
            f"{path}.authOptions.mode",
            "token-auth",
            "must be 'token' so only token holders can use the dashboard and Jobs API",
        )
    version = str(spec.get("rayVersion", ""))
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]]
    if len(parts) < 2 or tuple(parts) < (2, 52):
        yield Violation(
            ref,
            f"{path}.rayVersion",
            "ray-version",
            f"token auth needs Ray >= 2.52, got {version!r}",
        )
    head = spec.get("headGroupSpec") or {}
    hpath = f"{path}.headGroupSpec"
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        yield Violation(
            ref,
            f"{hpath}.serviceType",
            "dashboard-exposure",
            f"must be ClusterIP, got {head.get('serviceType')!r}",
        )
    if head.get("enableIngress"):
        yield Violation(
            ref,
            f"{hpath}.enableIngress",
            "dashboard-exposure",
            "must be false: an Ingress publishes the Jobs API",
        )
    rsp = head.get("rayStartParams") or {}
    if str(rsp.get("num-cpus")) != "0":
        yield Violation(
            ref,
            f"{hpath}.rayStartParams.num-cpus",
            "cpu-only-head",
            'must be "0" so no task or train worker lands on the head',
        )
    for key in ("redis-password", "redis-username"):
        if key in rsp:
            yield Violation(
                ref,
                f"{hpath}.rayStartParams.{key}",
                "no-inline-secrets",
                "use gcsFaultToleranceOptions with a secretKeyRef",
            )
    yield from _ray_group(ref, hpath, head)
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        gpath = f"{path}.workerGroupSpecs[{i}]"
        yield from _ray_group(ref, gpath, group)
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            yield Violation(
                ref,
                f"{gpath}.minReplicas",
                "kuberay",
                "minReplicas and maxReplicas are required without the autoscaler",
            )
        if lo is not None and hi is not None and lo > hi:
            yield Violation(ref, f"{gpath}.minReplicas", "kuberay", f"{lo} > maxReplicas {hi}")
    if autoscaling:
        options = spec.get("autoscalerOptions")
        if not isinstance(options, dict):
            yield Violation(
                ref,
                f"{path}.autoscalerOptions",
                "pss-restricted",
                "must set securityContext and resources for the autoscaler sidecar",
            )
        elif not isinstance(options.get("securityContext"), dict):
            # Its contents are Checkov's (the test writes the sidecar into the head pod).
            yield Violation(
                ref,
                f"{path}.autoscalerOptions.securityContext",
                "pss-restricted",
                "must be set: KubeRay's default autoscaler sidecar is not restricted",
            )
        else:
            yield from _guaranteed(ref, f"{path}.autoscalerOptions.resources", options.get("resources") or {})


def _ray_group(ref: str, path: str, group: dict) -> Iterator[Violation]:
    template = group.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if labels.get(PART_OF[0]) != PART_OF[1]:
        yield Violation(
            ref,
            f"{path}.template.metadata.labels.{PART_OF[0]}",
            "network-policy",
            f"must be {PART_OF[1]!r}: the NetworkPolicy selects Ray pods by it",
        )
    metrics = (group.get("rayStartParams") or {}).get("metrics-export-port")
    if metrics is not None and str(metrics) != str(METRICS_PORT):
        yield Violation(
            ref,
            f"{path}.rayStartParams.metrics-export-port",
            "network-policy",
            f"must be {METRICS_PORT} (or unset): the NetworkPolicy admits scrapes there only",
        )
    pod = template.get("spec") or {}
    ppath = f"{path}.template.spec"
    yield from _pod(ref, ppath, pod)
    containers = pod.get("containers") or []
    if containers:
        yield from _shm(ref, ppath, pod, containers[0], group.get("rayStartParams") or {}, path)


def _shm(ref, ppath, pod, container, start_params, gpath) -> Iterator[Violation]:
    cpath = f"{ppath}.containers[0]"
    limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    mount = next(
        (m for m in container.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"), None
    )
    if mount is None:
        yield Violation(
            ref,
            f"{cpath}.volumeMounts",
            "shm-sizing",
            "must mount a memory-backed emptyDir at /dev/shm (the default is 64Mi)",
        )
        return
    index, volume = next(
        (
            (i, v)
            for i, v in enumerate(pod.get("volumes") or [])
            if v.get("name") == mount.get("name")
        ),
        (None, None),
    )
    vpath = f"{ppath}.volumes[{index}].emptyDir"
    empty_dir = (volume or {}).get("emptyDir")
    if not isinstance(empty_dir, dict) or empty_dir.get("medium") != "Memory":
        yield Violation(
            ref, f"{vpath}.medium", "shm-sizing", "/dev/shm must be an emptyDir with medium Memory"
        )
        return
    size = empty_dir.get("sizeLimit")
    if size is None or limit is None:
        yield Violation(
            ref,
            f"{vpath}.sizeLimit",
            "shm-sizing",
            "must be set, derived from the container's memory limit",
        )
        return
    want = sizing.shm_mib(sizing.mib_of(limit))
    if sizing.mib_of(size) != want:
        yield Violation(
            ref,
            f"{vpath}.sizeLimit",
            "shm-sizing",
            f"{size} does not match {want}Mi derived from the memory limit {limit}",
        )
    store = start_params.get("object-store-memory")
    spath = f"{gpath}.rayStartParams.object-store-memory"
    if store is None:
        yield Violation(ref, spath, "shm-sizing", f"must be set below the /dev/shm size {size}")
    elif sizing.parse_quantity(store) >= sizing.parse_quantity(size):
        yield Violation(
            ref, spath, "shm-sizing", f"{store} bytes must be below the /dev/shm size {size}"
        )


def _pod(ref: str, path: str, pod: dict) -> Iterator[Violation]:
    # Checkov has a check for the Docker socket only, not for Pod Security's volume allow-list.
    for i, volume in enumerate(pod.get("volumes") or []):
        kinds = set(volume) - {"name"}
        for bad in sorted(kinds - ALLOWED_VOLUMES):
            yield Violation(
                ref,
                f"{path}.volumes[{i}].{bad}",
                "pss-restricted",
                f"volume type {bad!r} is not allowed",
            )
    for group in ("initContainers", "containers", "ephemeralContainers"):
        for i, container in enumerate(pod.get(group) or []):
            yield from _guaranteed(ref, f"{path}.{group}[{i}].resources", container.get("resources") or {})


def _guaranteed(ref: str, path: str, resources: dict) -> Iterator[Violation]:
    """Requests equal limits (Guaranteed QoS: the kubelet evicts a Ray node last and a GPU
    worker gets whole CPUs); Checkov checks only that each is set."""
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    for name in sorted(set(requests) & set(limits)):
        if sizing.parse_quantity(requests[name]) != sizing.parse_quantity(limits[name]):
            yield Violation(
                ref,
                f"{path}.requests.{name}",
                "guaranteed-resources",
                f"request {requests[name]} must equal limit {limits[name]}",
            )


def _inline_secrets(ref: str, obj: dict) -> Iterator[Violation]:
    for path, key, value, parent in _walk(obj, ""):
        if (
            key == "value"
            and isinstance(value, str)
            and value
            and isinstance(parent, dict)
            and SECRET_NAME.search(f"{parent.get('name', '')}|{_parent_key(path)}")
        ):
            yield Violation(
                ref,
                path,
                "no-inline-secrets",
                "credential given inline; use valueFrom.secretKeyRef",
            )
        elif (
            isinstance(value, str)
            and value
            and SECRET_NAME.search(key)
            and not REFERENCE_KEY.search(key)
            and key != "value"
        ):
            yield Violation(
                ref,
                path,
                "no-inline-secrets",
                "credential given inline; reference a Secret instead",
            )


def _parent_key(path: str) -> str:
    """'a.redisPassword.value' -> 'redisPassword'; env entries fall back to their name."""
    return path.rsplit(".", 2)[-2] if path.count(".") >= 1 else ""


def _walk(node, path) -> Iterator[tuple[str, str, object, object]]:
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            yield child, str(key), value, node
            yield from _walk(value, child)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _name_length(ref: str, obj: dict, limit: int) -> Iterator[Violation]:
    name = (obj.get("metadata") or {}).get("name", "")
    if len(name) > limit or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        yield Violation(
            ref,
            "metadata.name",
            "kuberay",
            f"must be a DNS-1035 label of at most {limit} characters",
        )


def _rayjob_lifecycle(ref: str, obj: dict) -> Iterator[Violation]:
    """Suspension, deletion and queueing of one RayJob; see `kuberay`, `cleanup`, `kueue`."""
    spec = obj.get("spec") or {}
    labels = (obj.get("metadata") or {}).get("labels") or {}
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    cluster_spec = spec.get("rayClusterSpec") or {}
    selector = bool(spec.get("clusterSelector"))
    strategy = spec.get("deletionStrategy")
    rules = (strategy or {}).get("deletionRules") or []
    legacy = bool(strategy) and ("onSuccess" in strategy or "onFailure" in strategy)
    base = "spec.deletionStrategy"

    if spec.get("suspend") and not shutdown:
        yield Violation(ref, "spec.suspend", "kuberay", "a suspended RayJob needs shutdownAfterJobFinishes: true")
    if not shutdown and (spec.get("ttlSecondsAfterFinished") or 0) > 0:
        yield Violation(
            ref, "spec.ttlSecondsAfterFinished", "kuberay", "needs shutdownAfterJobFinishes: true"
        )
    if rules and shutdown:
        yield Violation(
            ref,
            "spec.shutdownAfterJobFinishes",
            "kuberay",
            "mutually exclusive with deletionStrategy.deletionRules",
        )
    if rules and legacy:
        yield Violation(ref, base, "kuberay", "legacy onSuccess/onFailure and deletionRules cannot be combined")
    if strategy is not None and not rules and not (legacy and strategy.get("onSuccess") and strategy.get("onFailure")):
        yield Violation(ref, base, "kuberay", "needs deletionRules, or both onSuccess and onFailure")

    ttls: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
    for i, rule in enumerate(rules):
        path = f"{base}.deletionRules[{i}]"
        condition = rule.get("condition") or {}
        keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in condition]
        if len(keys) != 1:
            yield Violation(
                ref, f"{path}.condition", "kuberay", "exactly one of jobStatus and jobDeploymentStatus"
            )
            continue
        policy = rule.get("policy")
        if policy in ("DeleteCluster", "DeleteWorkers") and selector:
            yield Violation(ref, f"{path}.policy", "kuberay", f"{policy} is not allowed with clusterSelector")
        if policy == "DeleteWorkers" and cluster_spec.get("enableInTreeAutoscaling"):
            yield Violation(ref, f"{path}.policy", "kuberay", "DeleteWorkers is not allowed with autoscaling")
        end = (keys[0], condition[keys[0]])
        if policy in ttls.setdefault(end, {}):
            yield Violation(ref, path, "kuberay", f"a second {policy} rule for {end[0]} {end[1]}")
            continue
        ttls[end][policy] = (condition.get("ttlSeconds") or 0, i)
    for end, by_policy in ttls.items():
        earlier = None
        for policy in DELETION_ORDER:
            if policy not in by_policy:
                continue
            ttl, i = by_policy[policy]
            if earlier and ttl < earlier[1]:
                yield Violation(
                    ref,
                    f"{base}.deletionRules[{i}].condition.ttlSeconds",
                    "kuberay",
                    f"{policy} after {ttl}s comes before {earlier[0]} after {earlier[1]}s "
                    f"for {end[0]} {end[1]}; KubeRay needs DeleteWorkers <= DeleteCluster <= DeleteSelf",
                )
            earlier = (policy, ttl)

    if rules:
        for end in RAYJOB_ENDS:
            if "DeleteSelf" not in ttls.get(end, {}):
                yield Violation(
                    ref,
                    f"{base}.deletionRules",
                    "cleanup",
                    f"no DeleteSelf rule for {end[0]} {end[1]}: finished RayJobs pile up in etcd",
                )
    elif cluster_spec and not selector and not shutdown and not legacy:
        yield Violation(
            ref,
            base,
            "cleanup",
            "nothing deletes the RayJob's cluster when it ends: set deletionStrategy.deletionRules "
            "(shutdownAfterJobFinishes for a Kueue-queued job)",
        )

    if QUEUE_LABEL in labels:
        queue = labels[QUEUE_LABEL]
        if not isinstance(queue, str) or len(queue) > MAX_LABEL_VALUE or not QUEUE_NAME.fullmatch(queue):
            yield Violation(
                ref,
                f"metadata.labels.{QUEUE_LABEL}",
                "kueue",
                "must name a LocalQueue: a DNS-1123 subdomain of at most 63 characters",
            )
        if not shutdown:
            yield Violation(
                ref,
                "spec.shutdownAfterJobFinishes",
                "kueue",
                "must be true for a queued RayJob (Kueue's webhook refuses it otherwise)",
            )
        if (spec.get("ttlSecondsAfterFinished") or 0) > 0:
            yield Violation(
                ref,
                "spec.ttlSecondsAfterFinished",
                "kueue",
                "must be 0: Kueue returns the quota when the job ends, the cluster would run outside it",
            )
        if cluster_spec.get("enableInTreeAutoscaling"):
            yield Violation(
                ref,
                "spec.rayClusterSpec.enableInTreeAutoscaling",
                "kueue",
                "Kueue refuses autoscaling RayJobs (quota is reserved for a fixed size)",
            )


def _rbac(ref: str, obj: dict) -> Iterator[Violation]:
    # Wildcards are Checkov's (CKV_K8S_49); its Secret check (CKV2_K8S_5) wants a binding and
    # flags reading *all* Secrets, where stoker's Roles need none at all.
    for i, rule in enumerate(obj.get("rules") or []):
        if "secrets" in (rule.get("resources") or []):
            yield Violation(
                ref,
                f"rules[{i}].resources",
                "rbac",
                "no Secret access: KubeRay injects the tokens pods need",
            )


def _check_network_policies(objects: list[dict]) -> Iterator[Violation]:
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    selecting = [
        p
        for p in policies
        if (((p.get("spec") or {}).get("podSelector") or {}).get("matchLabels") or {}).get(
            PART_OF[0]
        )
        == PART_OF[1]
        and "Ingress" in ((p.get("spec") or {}).get("policyTypes") or [])
    ]
    if not selecting:
        yield Violation(
            "NetworkPolicy/*",
            f"spec.podSelector.matchLabels.{PART_OF[0]}",
            "network-policy",
            "no Ingress NetworkPolicy selects the Ray pods",
        )
    dashboard_rules = 0
    scraped: set[int] = set()
    for policy in selecting:
        ref = f"NetworkPolicy/{policy['metadata'].get('name', '?')}"
        for i, rule in enumerate(policy["spec"].get("ingress") or []):
            ports = [p.get("port") for p in rule.get("ports") or []]
            if not ports or DASHBOARD_PORT in ports:
                dashboard_rules += 1
            peers = rule.get("from") or []
            for j, peer in enumerate(peers):
                namespaces = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
                if "namespaceSelector" not in peer:
                    continue
                if not ports:
                    yield Violation(
                        ref,
                        f"spec.ingress[{i}].ports",
                        "network-policy",
                        "pods of other namespaces may only reach listed ports",
                    )
                elif DASHBOARD_PORT in ports and namespaces.get("kubernetes.io/metadata.name") != "kuberay-system":
                    yield Violation(
                        ref,
                        f"spec.ingress[{i}].from[{j}]",
                        "network-policy",
                        f"only KubeRay's operator may reach the dashboard port {DASHBOARD_PORT} from another namespace",
                    )
                if namespaces.get(MONITORING_NAMESPACE[0]) == MONITORING_NAMESPACE[1]:
                    scraped.update(p for p in ports if p in METRICS_PORTS)
            if not peers:
                yield Violation(
                    ref,
                    f"spec.ingress[{i}].from",
                    "network-policy",
                    "an empty 'from' admits every source",
                )
            for j, peer in enumerate(peers):
                selector = peer.get("podSelector") or {}
                if "ipBlock" in peer or not (
                    selector.get("matchLabels") or selector.get("matchExpressions")
                ):
                    yield Violation(
                        ref,
                        f"spec.ingress[{i}].from[{j}]",
                        "network-policy",
                        "only pods selected by label may connect",
                    )
    if selecting and not dashboard_rules:
        yield Violation(
            "NetworkPolicy/*",
            "spec.ingress",
            "network-policy",
            f"no rule admits labelled clients to the dashboard port {DASHBOARD_PORT}",
        )
    if selecting and scraped != set(METRICS_PORTS):
        missing = ", ".join(str(p) for p in METRICS_PORTS if p not in scraped)
        yield Violation(
            "NetworkPolicy/*",
            "spec.ingress",
            "network-policy",
            f"no rule lets Prometheus in a namespace labelled "
            f"{MONITORING_NAMESPACE[0]}={MONITORING_NAMESPACE[1]} scrape Ray's metrics ports {missing}",
        )
