"""What each kustomize overlay in `k8s/overlays/` provides, as data the renderer can use.

`k8s/` is not shipped in the wheel, so `render_rayjob` cannot read the overlays at run time.
This table mirrors them instead, and `tests/k8s/test_k8s_render.py` builds every overlay
with kustomize and compares it to this table, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stoker.ray_internals import WRITTEN_FOR

RAY_VERSION = WRITTEN_FOR["ray"]
"""The Ray of the cluster's image: the one stoker is written for (the seam's pin)."""
# The stoker runtime image (k8s/image/Dockerfile), tagged with the package version.
# Overlays keep this name so `kind load docker-image stoker:0.1.0` works; real clusters
# retarget it with `kustomize edit set image stoker=REGISTRY/stoker:0.1.0` or `image=`.
STOKER_IMAGE = "stoker:0.1.0"

SHARED_PVC = "stoker-shared"
SHARED_MOUNT = "/mnt/shared"
STAGING_DIR = ".stoker-staging"
"""Under SHARED_MOUNT: the staging copies of `s3://` runs and searches (STOKER_STAGING_DIR)."""
CONFIG_MOUNT = "/config"

HEAD_SERVICE_ACCOUNT = "stoker-ray-head"
WORKER_SERVICE_ACCOUNT = "stoker-ray-worker"
SUBMITTER_SERVICE_ACCOUNT = "stoker-submitter"

# The base NetworkPolicy selects Ray pods by PART_OF and lets only pods that carry
# DASHBOARD_CLIENT reach the dashboard / Jobs API on 8265.
PART_OF = ("app.kubernetes.io/part-of", "stoker")
DASHBOARD_CLIENT = ("stoker.io/dashboard-client", "true")
DASHBOARD_PORT = 8265
# Prometheus pods in a namespace labelled MONITORING_NAMESPACE may scrape Ray's metrics:
# every Ray pod exports on 8080 (KubeRay's default metrics-export-port), the head also
# serves the autoscaler's (44217) and the dashboard's (44227).
MONITORING_NAMESPACE = ("stoker.io/monitoring", "true")
METRICS_PORT = 8080
METRICS_PORTS = (METRICS_PORT, 44217, 44227)

# The ray image's `ray` user; GID 100 ("users") owns its home and conda env.
RAY_UID = 1000
RAY_GID = 100

# Pod Security Standards "restricted", container half. Also copied by KubeRay onto the
# wait-gcs-ready init container it injects into worker pods.
CONTAINER_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": RAY_UID,
    "runAsGroup": RAY_GID,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Pod half. fsGroupChangePolicy OnRootMismatch: without it the kubelet re-chowns the whole
# checkpoint volume on every pod start, which takes minutes on a large shared PVC.
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": RAY_UID,
    "runAsGroup": RAY_GID,
    "fsGroup": RAY_GID,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# NCCL defaults for pod networking. The pod's interface is eth0; left alone NCCL may pick
# lo or a CNI bridge. Async error handling makes a dead peer raise instead of hanging the
# collective forever (a job stuck in RUNNING is worse than a failed one that retries).
NCCL_ENV = (
    ("NCCL_SOCKET_IFNAME", "eth0"),
    ("NCCL_DEBUG", "WARN"),
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
)


@dataclass(frozen=True)
class NodeType:
    """The largest pod one node of this type takes (already below allocatable)."""

    cpu: int
    memory_mib: int
    gpus: int = 0
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Overlay:
    name: str
    head: NodeType
    worker: NodeType
    worker_group: str
    # Worker pods the overlay's standing RayCluster runs (kustomize output).
    replicas: int
    # Autoscaling overlays only: the ceiling the autoscaler may grow the standing group to.
    max_replicas: int | None = None
    autoscaler: dict | None = None
    worker_idle_timeout_s: int | None = None
    gcs_fault_tolerance: dict | None = None


_AUTOSCALER = {
    "version": "v2",
    "upscalingMode": "Default",
    # Short enough that idle GPU nodes go back quickly, long enough to survive the gap
    # between two Tune trials.
    "idleTimeoutSeconds": 300,
    "imagePullPolicy": "IfNotPresent",
    "resources": {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    },
    "securityContext": CONTAINER_SECURITY_CONTEXT,
}

# Redis lives outside the cluster's lifecycle; its password only ever comes from a Secret.
_GCS_FT = {
    "redisAddress": "redis.stoker-redis.svc.cluster.local:6379",
    "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "stoker-redis", "key": "password"}}},
}

_BASE_HEAD = NodeType(cpu=2, memory_mib=8192)
_BASE_GPU = NodeType(cpu=8, memory_mib=32768, gpus=1, tolerations=(GPU_TOLERATION,))

OVERLAYS: dict[str, Overlay] = {
    o.name: o
    for o in (
        Overlay(
            name="local-cpu",
            head=NodeType(cpu=1, memory_mib=2048),
            worker=NodeType(cpu=3, memory_mib=4096),
            worker_group="cpu",
            replicas=1,
        ),
        Overlay(
            name="gpu-multinode",
            head=NodeType(cpu=4, memory_mib=16384),
            # An 8-GPU node (e.g. 8x H100, 96+ vCPU, 1 TiB) minus daemonset headroom.
            worker=NodeType(
                cpu=88,
                memory_mib=819200,
                gpus=8,
                node_selector={"nvidia.com/gpu.present": "true"},
                tolerations=(GPU_TOLERATION,),
                env=NCCL_ENV,
            ),
            worker_group="gpu",
            replicas=2,
        ),
        Overlay(
            name="autoscaling",
            head=_BASE_HEAD,
            worker=_BASE_GPU,
            worker_group="gpu",
            replicas=0,
            max_replicas=8,
            autoscaler=_AUTOSCALER,
            worker_idle_timeout_s=120,
        ),
        Overlay(
            name="ha",
            head=_BASE_HEAD,
            worker=_BASE_GPU,
            worker_group="gpu",
            replicas=1,
            gcs_fault_tolerance=_GCS_FT,
        ),
    )
}
