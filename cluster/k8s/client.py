"""Apply, watch and delete stoker's objects on a cluster with the official `kubernetes` client.

    apply(objects: list[dict], namespace: str, *, dry_run: bool = False,
          api_client: kubernetes.client.ApiClient | None = None) -> list[dict]
        Server-side apply (PATCH application/apply-patch+yaml, fieldManager "stoker",
        force, fieldValidation Strict) of each object into `namespace`, in order; returns the
        objects as the API server stored them. A RayJob's run-config ConfigMap is then made
        owned by the RayJob, so when KubeRay's deletion rules delete the RayJob (DeleteSelf)
        the garbage collector takes the ConfigMap along. `dry_run=True` validates on the
        server and stores nothing.

    status(name: str, namespace: str, deadline_s: float, *, poll_s: float = 5.0,
           api_client=None) -> JobState
        Polls the RayJob (`name`: run name or RayJob name) and its pods until it succeeds,
        fails, or `deadline_s` passes, and reconciles them into one `JobState`: pending (with
        a reason such as `ImagePullBackOff: ...` or `Unschedulable: ...`), running, succeeded
        or failed (with the reason). `deadline_s=0` takes one snapshot.

    delete(name: str, namespace: str, *, api_client=None) -> list[str]
        Deletes the RayJob (KubeRay's owner references take its RayCluster and submitter Job
        along) and its run-config ConfigMap; returns what was deleted, e.g. ["rayjob/x",
        "configmap/x-config"]. Already-gone objects are skipped.

    reconcile(rayjob: dict, pods: list[dict]) -> JobState     the pure half of `status`

Credentials come from the kubeconfig (`KUBECONFIG`, else ~/.kube/config) or, inside a pod,
the mounted ServiceAccount. No kubeconfig, an unreachable API server or a cluster without
KubeRay's CRDs raise `K8sConfigError` naming which.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field, replace

from stoker.cluster.k8s.render import QUEUE_LABEL, RUN_LABEL, K8sConfigError, rayjob_name

FIELD_MANAGER = "stoker"
RAY_GROUP_VERSION = "ray.io/v1"
TERMINAL = ("succeeded", "failed")

# Kinds stoker applies: (apiVersion, kind) -> (API prefix, plural).
KINDS = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
    ),
    ("ray.io/v1", "RayJob"): ("/apis/ray.io/v1", "rayjobs"),
    ("ray.io/v1", "RayCluster"): ("/apis/ray.io/v1", "rayclusters"),
    ("ray.io/v1", "RayService"): ("/apis/ray.io/v1", "rayservices"),
}
# Container states that will not fix themselves: worth reporting as the pending reason.
STUCK_WAITING = {
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


@dataclass(frozen=True)
class JobState:
    state: str  # pending | running | succeeded | failed
    reason: str = ""
    job_deployment_status: str = ""
    job_status: str = ""
    pods: dict[str, str] = field(default_factory=dict)  # pod name -> phase or stuck reason
    timed_out: bool = False

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def apply(
    objects: list[dict], namespace: str, *, dry_run: bool = False, api_client=None
) -> list[dict]:
    """Server-side apply `objects` into `namespace`; see the module docstring."""
    _check_namespace(namespace)
    api = _api(api_client)
    targets = []
    for i, obj in enumerate(objects):
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key not in KINDS:
            raise K8sConfigError(f"objects[{i}]: {key[0]}/{key[1]} is not a kind stoker applies")
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            raise K8sConfigError(f"objects[{i}].metadata.name: missing")
        targets.append((key, name, obj))
    if any(key[0] == RAY_GROUP_VERSION for key, _, _ in targets):
        _require_kuberay(
            api, {KINDS[key][1] for key, _, _ in targets if key[0] == RAY_GROUP_VERSION}
        )

    def server_side_apply(key, name, body):
        prefix, plural = KINDS[key]
        body["metadata"]["namespace"] = namespace  # like `kubectl apply -n`
        query = {"fieldManager": FIELD_MANAGER, "force": "true", "fieldValidation": "Strict"}
        if dry_run:
            query["dryRun"] = "All"
        return _call(
            api,
            "PATCH",
            f"{prefix}/namespaces/{namespace}/{plural}/{name}",
            what=f"{key[1].lower()}/{name}",
            query=query,
            body=body,
            content_type="application/apply-patch+yaml",
        )

    # The ConfigMap goes first: the RayJob's head pod mounts it as soon as the cluster starts.
    applied = [server_side_apply(key, name, copy.deepcopy(obj)) for key, name, obj in targets]
    if dry_run:
        return applied
    uids = {
        name: (stored.get("metadata") or {}).get("uid")
        for (key, name, _), stored in zip(targets, applied, strict=True)
        if key == (RAY_GROUP_VERSION, "RayJob")
    }
    for i, (key, name, obj) in enumerate(targets):
        owner = name.removesuffix("-config")
        if key == ("v1", "ConfigMap") and name.endswith("-config") and uids.get(owner):
            body = copy.deepcopy(obj)
            body["metadata"]["ownerReferences"] = [
                {"apiVersion": RAY_GROUP_VERSION, "kind": "RayJob", "name": owner, "uid": uids[owner]}
            ]
            applied[i] = server_side_apply(key, name, body)
    return applied


def status(
    name: str, namespace: str, deadline_s: float, *, poll_s: float = 5.0, api_client=None
) -> JobState:
    """Reconcile the RayJob and its pods, polling until terminal or the deadline; see above."""
    _check_namespace(namespace)
    name = rayjob_name(name)
    api = _api(api_client)
    _require_kuberay(api, {"rayjobs"})
    end = time.monotonic() + max(0.0, deadline_s)
    while True:
        job = _call(
            api,
            "GET",
            f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs/{name}",
            what=f"rayjob/{name}",
            missing=f"rayjob/{name}: not found in namespace {namespace} (a finished RayJob is "
            "deleted by its deletion rules, by default a day after it ends)",
        )
        pods = _list_pods(api, namespace, name, (job.get("status") or {}).get("rayClusterName"))
        state = reconcile(job, pods)
        remaining = end - time.monotonic()
        if state.done:
            return state
        if remaining <= 0:
            # Report where it is stuck instead of waiting forever.
            return replace(state, timed_out=deadline_s > 0)
        time.sleep(min(poll_s, remaining))


def delete(name: str, namespace: str, *, api_client=None) -> list[str]:
    """Delete the RayJob and its ConfigMap; see the module docstring."""
    _check_namespace(namespace)
    name = rayjob_name(name)
    api = _api(api_client)
    deleted = []
    for what, path in (
        (f"rayjob/{name}", f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs/{name}"),
        (f"configmap/{name}-config", f"/api/v1/namespaces/{namespace}/configmaps/{name}-config"),
    ):
        # Background: return now; the garbage collector removes the cluster and pods.
        gone = _call(
            api,
            "DELETE",
            path,
            what=what,
            body={"propagationPolicy": "Background"},
            content_type="application/json",
            missing=None,
        )
        if gone is not None:
            deleted.append(what)
    return deleted


def reconcile(rayjob: dict, pods: list[dict]) -> JobState:
    """One answer from KubeRay's two status fields and what the pods say."""
    st = rayjob.get("status") or {}
    deployment, job_status = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    pod_states = {p["metadata"]["name"]: _pod_state(p) for p in pods}
    problem = next((r for r in (_pod_problem(p) for p in pods) if r), "")
    base = {"job_deployment_status": deployment, "job_status": job_status, "pods": pod_states}
    detail = ": ".join(x for x in (st.get("reason", ""), _one_line(st.get("message", ""))) if x)

    if job_status == "SUCCEEDED":
        return JobState("succeeded", **base)
    if deployment == "Failed":
        return JobState("failed", detail or "Failed", **base)
    if job_status in ("FAILED", "STOPPED") or deployment == "Complete":
        return JobState("failed", detail or f"job {job_status or 'ended'}", **base)
    if deployment == "Running" and job_status == "RUNNING":
        return JobState("running", problem, **base)
    if (rayjob.get("spec") or {}).get("suspend") and deployment in ("", "New", "Suspended"):
        queue = ((rayjob.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
        where = f"Kueue queue {queue!r}" if queue else "suspend: true"
        return JobState("pending", f"Suspended: waiting for admission ({where})", **base)
    if deployment == "Retrying":
        tries = f"{st.get('failed', 0)} failed of backoffLimit {(rayjob.get('spec') or {}).get('backoffLimit', 0)}"
        return JobState("pending", f"Retrying ({tries}); resumes from the last checkpoint", **base)
    return JobState("pending", problem or deployment or "New", **base)


def _pod_state(pod: dict) -> str:
    return _pod_problem(pod).split(":", 1)[0] or (pod.get("status") or {}).get("phase", "Unknown")


def _pod_problem(pod: dict) -> str:
    name = pod["metadata"]["name"]
    st = pod.get("status") or {}
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING:
            return f"{waiting['reason']}: pod {name} container {cs['name']}: {_one_line(waiting.get('message', ''))}"
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            if (state.get("terminated") or {}).get("reason") == "OOMKilled":
                return f"OOMKilled: pod {name} container {cs['name']} exceeded its memory limit"
    for cond in st.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason")
        ):
            return f"{cond['reason']}: pod {name}: {_one_line(cond.get('message', ''))}"
    if st.get("phase") == "Failed":
        return f"PodFailed: pod {name}: {_one_line(st.get('message') or st.get('reason') or '')}"
    return ""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _list_pods(api, namespace: str, name: str, cluster: str | None) -> list[dict]:
    path = f"/api/v1/namespaces/{namespace}/pods"
    pods = _call(api, "GET", path, what="pods", query={"labelSelector": f"{RUN_LABEL}={name}"})[
        "items"
    ]
    if not pods and cluster:  # a RayJob stoker did not render: fall back to KubeRay's label
        pods = _call(
            api, "GET", path, what="pods", query={"labelSelector": f"ray.io/cluster={cluster}"}
        )["items"]
    return pods


def _require_kuberay(api, plurals: set[str]) -> None:
    hint = "install the KubeRay 1.7 operator and CRDs (k8s/operator/README.md)"
    found = _call(
        api,
        "GET",
        f"/apis/{RAY_GROUP_VERSION}",
        what="KubeRay CRDs",
        missing=f"KubeRay CRDs: {RAY_GROUP_VERSION} is not served by this cluster; {hint}",
    )
    served = {r.get("name") for r in found.get("resources") or []}
    missing = sorted(plurals - served)
    if missing:
        raise K8sConfigError(
            f"KubeRay CRDs: {', '.join(missing)} missing from {RAY_GROUP_VERSION}; {hint}"
        )


def _check_namespace(namespace: str) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise K8sConfigError("namespace: must be a non-empty string")


def _api(api_client):
    """An ApiClient from the caller, the in-cluster ServiceAccount or the kubeconfig."""
    if api_client is not None:
        return api_client
    from kubernetes import client, config  # lazy: rendering must not need the client

    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            # Read KUBECONFIG now: the client captures it once, at import time.
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or None,
                client_configuration=configuration,
            )
    except (config.ConfigException, OSError) as exc:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise K8sConfigError(
            f"kubeconfig: no usable kubeconfig at {where} ({_one_line(exc)}); set KUBECONFIG"
        ) from None
    return client.ApiClient(configuration)


_MISSING = object()


def _call(api, method, path, *, what, query=None, body=None, content_type=None, missing=_MISSING):
    """One request through the client's own serialization, auth and transport.

    404 returns `missing` (None) or, if `missing` is a message, raises it; other failures
    raise K8sConfigError naming `what`.
    """
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    request = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    try:
        response = api.call_api(*request, _request_timeout=30)
        response.read()
    except (HTTPError, ApiException) as exc:
        host = api.configuration.host
        raise K8sConfigError(
            f"cluster: cannot reach the API server at {host} ({_one_line(exc, 200)})"
        ) from None
    if response.status == 404 and missing is not _MISSING:
        if isinstance(missing, str):
            raise K8sConfigError(missing)
        return missing
    if not 200 <= response.status < 300:
        raise K8sConfigError(
            f"{what}: {method} refused by the API server ({response.status}): {_message(response.data)}"
        )
    return json.loads(response.data) if response.data else {}


def _message(data: bytes) -> str:
    try:
        return _one_line(json.loads(data).get("message", ""))
    except (ValueError, AttributeError):
        return _one_line(data.decode(errors="replace"))
