"""Render a run config into the Kubernetes objects that run it on KubeRay. Pure: no cluster.

    render_rayjob(run: RunSpec, config_text: str, overlay: str, run_name: str, *,
                  image: str | None = None,
                  backoff_limit: int = 2,
                  active_deadline_seconds: int = 86400,
                  pre_running_deadline_seconds: int = 1800,
                  queue: str | None = None,
                  keep_failed_cluster_s: int | None = None,
                  keep_finished_job_s: int | None = None) -> list[dict]

returns `[ConfigMap, RayJob]`:

- the ConfigMap `<name>-config` carries `config_text` verbatim as `run.yaml`, mounted on the
  Ray head at `/config`, where the job's driver runs;
- the RayJob `<name>` runs `stoker train /config/run.yaml` (`stoker tune ...` when the config
  has a `tune` section) on a RayCluster of its own, shaped by the overlay's node types and
  sized from the run's `scaling` section (and `tune.max_concurrent_trials` when the run is the
  CLI's `RunConfig` with a search). `run` is the validated run `config_text` describes: the
  renderer reads typed sections, so a key it sizes with is one the run config accepts.

Clean-up (`deletion_settings`). Without a queue: KubeRay 1.7's `deletionStrategy.deletionRules`
(feature gate `RayJobDeletionPolicy`, beta and on by default since KubeRay 1.6). The cluster
goes as soon as the job succeeds and `keep_failed_cluster_s` (default 3600) after it fails,
so its logs and dashboard can still be read; the RayJob object itself goes
`keep_finished_job_s` (default 86400) after the end, never before its cluster, so finished
RayJobs do not pile up in etcd. KubeRay refuses rules next to `shutdownAfterJobFinishes:
true` or a non-zero `ttlSecondsAfterFinished`, so neither is set. No rule can match a Ray job
that was stopped (`STOPPED`): `stoker k8s delete` it.

With `queue`: Kueue's `kueue.x-k8s.io/queue-name` label and `suspend: true`, for Kueue to
admit. Kueue's webhook requires `shutdownAfterJobFinishes: true`, which rules out deletion
rules (kueue issue 3994), and Kueue hands the quota back the moment the job ends, so a
cluster kept for debugging would run outside the quota: queued jobs get
`shutdownAfterJobFinishes: true` with `ttlSecondsAfterFinished: 0`, either keep time is
refused, and their RayJob objects stay until `stoker k8s delete`.

`<name>` is `rayjob_name(run_name)`: DNS-1035 safe, at most 47 characters (KubeRay rejects
longer RayJob names because it appends 6 for the cluster, whose head Service then needs
9 more within DNS-1123's 63; a RayJob KubeRay rejects would hold its Kueue quota, kueue issue
13413), and the same on every call, so re-applying after a failure hits the same object and a
KubeRay retry (`backoffLimit`) lands on the same run directory on the shared volume. Ray Train
resumes from the last checkpoint there. That is why `storage` must be on the shared volume
(`/mnt/shared/...`) or an object-store URI. A longer run name is shortened with a stable hash
of the whole name; `rayjob_name_note` says so in one line for the CLI to print.

Deadlines keep jobs out of limbo: `preRunningDeadlineSeconds` fails a job whose cluster never
comes up (image pull errors, no GPUs free), `activeDeadlineSeconds` bounds the whole run.

    rayjob_name(run_name: str) -> str
    rayjob_name_note(run_name: str) -> str    '' when the RayJob is named as the run
    K8sConfigError(ValueError)   one-line message naming the key at fault

Bad input raises `K8sConfigError`: unknown overlay, more GPUs per worker than the overlay's
node type has, memory too small for `/dev/shm` + object store + the worker processes, ...
"""

from __future__ import annotations

import copy
import hashlib
import math
import posixpath
import re
from dataclasses import dataclass

from stoker.cluster.jobs import job_verb
from stoker.cluster.k8s import sizing
from stoker.cluster.k8s.profiles import (
    CONFIG_MOUNT,
    CONTAINER_SECURITY_CONTEXT,
    DASHBOARD_CLIENT,
    HEAD_SERVICE_ACCOUNT,
    OVERLAYS,
    PART_OF,
    POD_SECURITY_CONTEXT,
    RAY_VERSION,
    SHARED_MOUNT,
    SHARED_PVC,
    STAGING_DIR,
    STOKER_IMAGE,
    SUBMITTER_SERVICE_ACCOUNT,
    WORKER_SERVICE_ACCOUNT,
    NodeType,
    Overlay,
)
from stoker.trainer.config import ScalingConfig
from stoker.trainer.run_dir import STAGING_ENV
from stoker.trainer.run_spec import RunSpec
from stoker.tune.schema import SearchRun

# KubeRay: RayCluster names <= 53 chars (its head Service "<cluster>-head-svc" must fit
# DNS-1123's 63), and a RayJob's cluster is "<rayjob>-xxxxx".
MAX_RAYJOB_NAME = 47
# Kueue reads the queue from this label; the value names a LocalQueue in the job's namespace.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# A LocalQueue name is an object name (DNS-1123 subdomain) that must also be a label value.
QUEUE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
MAX_LABEL_VALUE = 63
# ttlSeconds is an int32 in the RayJob CRD.
MAX_TTL_SECONDS = 2**31 - 1
DEFAULT_KEEP_FAILED_CLUSTER_S = 3600
DEFAULT_KEEP_FINISHED_JOB_S = 86400
# The API server rejects objects over ~1 MiB; leave room for the ConfigMap's metadata.
MAX_CONFIG_BYTES = 900 * 1024
# A DeepSpeed worker process (torch, NCCL, the model) needs about this much outside shm.
MIN_WORKER_HEAP_MIB = 1024

RUN_LABEL = "stoker.io/run"


class K8sConfigError(ValueError):
    """A run config, overlay or cluster that cannot work; the message names the key."""


@dataclass(frozen=True)
class PodShape:
    """One worker pod of a rendered job: its resources and how many train workers it hosts."""

    replicas: int
    workers_per_pod: int
    cpu: int
    memory_mib: int
    gpus: int


def rayjob_name(run_name: str) -> str:
    """The RayJob name for a run: stable, DNS-1035, <= 47 chars (hash suffix if shortened)."""
    if not isinstance(run_name, str) or not run_name.strip():
        raise K8sConfigError("run_name: must be a non-empty string")
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.strip().lower())
    name = re.sub(r"-+", "-", name).strip("-")
    if not name:
        raise K8sConfigError(f"run_name: {run_name!r} has no letters or digits to name a RayJob")
    if not name[0].isalpha():  # DNS-1035 labels start with a letter
        name = f"run-{name}"
    if len(name) > MAX_RAYJOB_NAME:
        # Different long names must not collide after truncation, so hash the original.
        digest = hashlib.sha256(run_name.encode()).hexdigest()[:6]
        name = f"{name[: MAX_RAYJOB_NAME - 7].rstrip('-')}-{digest}"
    return name


def rayjob_name_note(run_name: str) -> str:
    """One line for stderr when the RayJob cannot carry the run's own name; '' otherwise."""
    name = rayjob_name(run_name)
    if name == run_name:
        return ""
    if len(run_name) > MAX_RAYJOB_NAME:
        why = (
            f"is {len(run_name)} characters, over KubeRay's {MAX_RAYJOB_NAME}-character RayJob "
            "name limit (Kueue-queued jobs over it hold their quota, kueue issue 13413); "
            "shortened with a stable hash"
        )
    else:
        why = "is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter)"
    return f"run name {run_name!r} {why}: RayJob {name!r}"


def render_rayjob(
    run: RunSpec,
    config_text: str,
    overlay: str,
    run_name: str,
    *,
    image: str | None = None,
    backoff_limit: int = 2,
    active_deadline_seconds: int = 86400,
    pre_running_deadline_seconds: int = 1800,
    queue: str | None = None,
    keep_failed_cluster_s: int | None = None,
    keep_finished_job_s: int | None = None,
) -> list[dict]:
    """Build `[ConfigMap, RayJob]` for one run; see the module docstring."""
    profile = _overlay(overlay)
    cleanup = deletion_settings(
        queue=queue,
        keep_failed_cluster_s=keep_failed_cluster_s,
        keep_finished_job_s=keep_finished_job_s,
    )
    if queue is not None and profile.autoscaler is not None:
        raise K8sConfigError(
            f"queue: overlay {profile.name!r} runs the Ray autoscaler, which Kueue refuses "
            "for queued RayJobs (quota is reserved for a fixed size); use a fixed-size overlay"
        )
    _check_storage(run.storage)
    _check_job_inputs(config_text, backoff_limit=backoff_limit, active_deadline_seconds=active_deadline_seconds,
                      pre_running_deadline_seconds=pre_running_deadline_seconds)

    name = rayjob_name(run_name)
    verb = job_verb(run.model_dump(mode="json"))  # the rule `stoker submit`'s jobs follow too
    # A search (the CLI's RunConfig is a SearchRun) runs max_concurrent_trials trainings at once.
    concurrent = run.tune.max_concurrent_trials if isinstance(run, SearchRun) and run.tune else None
    shape = size_workers(run.scaling, profile, concurrent)
    labels = {PART_OF[0]: PART_OF[1], "app.kubernetes.io/managed-by": "stoker", RUN_LABEL: name}
    config_map_name = f"{name}-config"
    image = image or STOKER_IMAGE

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name, "labels": dict(labels)},
        "data": {"run.yaml": config_text},
    }
    job_labels = {**labels, "stoker.io/overlay": profile.name}
    if queue is not None:
        job_labels[QUEUE_LABEL] = queue
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "labels": job_labels,
            "annotations": {"stoker.io/run-name": run_name},
        },
        "spec": {
            "entrypoint": f"stoker {verb} {CONFIG_MOUNT}/run.yaml",
            "submissionMode": "K8sJobMode",
            "backoffLimit": backoff_limit,
            "activeDeadlineSeconds": active_deadline_seconds,
            "preRunningDeadlineSeconds": pre_running_deadline_seconds,
            **cleanup,
            "submitterPodTemplate": submitter_template(image, name),
            "rayClusterSpec": ray_cluster_spec(
                profile, image, shape, run_label=name, config_map=config_map_name
            ),
        },
    }
    return [config_map, rayjob]


def _check_job_inputs(config_text: str, **limits: int) -> None:
    """The config's text fits a ConfigMap, and each RayJob limit is a whole number in range."""
    if not isinstance(config_text, str) or not config_text.strip():
        raise K8sConfigError("config_text: empty; pass the run config file's text")
    if len(config_text.encode()) > MAX_CONFIG_BYTES:
        raise K8sConfigError(
            f"config_text: {len(config_text.encode())} bytes exceeds the "
            f"{MAX_CONFIG_BYTES} a ConfigMap can carry; move data out of the run config"
        )
    for key, value in limits.items():
        low = 0 if key == "backoff_limit" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise K8sConfigError(f"{key}: must be an integer >= {low}, got {value!r}")


def deletion_settings(
    *, queue: str | None, keep_failed_cluster_s: int | None, keep_finished_job_s: int | None
) -> dict:
    """The RayJob spec fields that clean up after it (and queue it); see the module docstring."""
    if queue is not None:
        if not isinstance(queue, str) or len(queue) > MAX_LABEL_VALUE or not QUEUE_NAME.fullmatch(queue):
            raise K8sConfigError(
                f"queue: {queue!r} is not a valid Kueue queue name: it must be a label value "
                f"that is also a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', "
                f"starting and ending with a letter or digit, at most {MAX_LABEL_VALUE} characters)"
            )
        if keep_failed_cluster_s:
            raise K8sConfigError(
                f"keep_failed_cluster_s: {keep_failed_cluster_s!r} cannot be kept with a queue: "
                "Kueue releases the quota when the job ends and requires "
                "shutdownAfterJobFinishes, so a queued job's cluster goes at once"
            )
        if keep_finished_job_s is not None:
            raise K8sConfigError(
                "keep_finished_job_s: not with a queue: Kueue requires shutdownAfterJobFinishes, "
                "which KubeRay 1.7 refuses next to the deletion rules that would delete the "
                "RayJob later; delete it with `stoker k8s delete`"
            )
        # Kueue admits by flipping suspend to false; KubeRay allows suspend only with
        # shutdownAfterJobFinishes, and Kueue's webhook requires it too.
        return {"suspend": True, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 0}

    if keep_failed_cluster_s is None:
        keep_failed_cluster_s = DEFAULT_KEEP_FAILED_CLUSTER_S
    if keep_finished_job_s is None:
        keep_finished_job_s = DEFAULT_KEEP_FINISHED_JOB_S
    for key, value in (
        ("keep_failed_cluster_s", keep_failed_cluster_s),
        ("keep_finished_job_s", keep_finished_job_s),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TTL_SECONDS:
            raise K8sConfigError(f"{key}: must be an integer 0..{MAX_TTL_SECONDS} (seconds), got {value!r}")
    # KubeRay requires TTLs per condition to grow DeleteWorkers <= DeleteCluster <= DeleteSelf.
    forget_failed = max(keep_failed_cluster_s, keep_finished_job_s)
    rules = [
        ({"jobStatus": "SUCCEEDED"}, "DeleteCluster", 0),
        ({"jobStatus": "SUCCEEDED"}, "DeleteSelf", keep_finished_job_s),
        ({"jobStatus": "FAILED"}, "DeleteCluster", keep_failed_cluster_s),
        ({"jobStatus": "FAILED"}, "DeleteSelf", forget_failed),
        # Deadlines, exhausted retries and failed submissions end the RayJob without the Ray
        # job reaching FAILED: KubeRay matches those on the deployment status.
        ({"jobDeploymentStatus": "Failed"}, "DeleteCluster", keep_failed_cluster_s),
        ({"jobDeploymentStatus": "Failed"}, "DeleteSelf", forget_failed),
    ]
    return {
        "deletionStrategy": {
            "deletionRules": [
                {"policy": policy, "condition": {**condition, "ttlSeconds": ttl}}
                for condition, policy, ttl in rules
            ]
        }
    }


def size_workers(scaling: ScalingConfig, profile: Overlay, concurrent_trials: int | None = None) -> PodShape:
    """Pack the run's train workers into as few pods of the overlay's node type as fit."""
    num_workers, data_cpus = scaling.num_workers, scaling.data_cpus
    cpus_per_worker, memory_gb = scaling.cpus_per_worker, scaling.memory_per_worker_gb
    node = profile.worker
    # Tune runs several multi-worker trials at once; the cluster must hold all of them.
    total_workers = num_workers * (concurrent_trials or 1)

    if scaling.use_gpu:
        gpus_per_worker = scaling.gpus_per_worker
        if node.gpus == 0:
            gpu_overlays = ", ".join(sorted(n for n, o in OVERLAYS.items() if o.worker.gpus))
            raise K8sConfigError(
                f"scaling.use_gpu: overlay {profile.name!r} has no GPU nodes; "
                f"use one of {gpu_overlays}"
            )
        if gpus_per_worker > node.gpus:
            raise K8sConfigError(
                f"scaling.gpus_per_worker: {gpus_per_worker:g} exceeds the {node.gpus} GPU(s) "
                f"of a worker node in overlay {profile.name!r}"
            )
        per_pod = min(total_workers, math.floor(node.gpus / gpus_per_worker))
        gpus = math.ceil(per_pod * gpus_per_worker)
        share = gpus / node.gpus  # CPU and memory follow the pod's share of the node's GPUs
    else:
        gpus = 0
        step = cpus_per_worker or 1
        if step + data_cpus > node.cpu:
            raise K8sConfigError(
                f"scaling.cpus_per_worker: {step:g} + data_cpus {data_cpus:g} exceeds the "
                f"{node.cpu} CPUs of a worker node in overlay {profile.name!r}"
            )
        per_pod = min(total_workers, math.floor((node.cpu - data_cpus) / step))
        share = math.ceil(per_pod * step + data_cpus) / node.cpu

    if cpus_per_worker is not None:
        cpu = math.ceil(per_pod * cpus_per_worker + data_cpus)
        if cpu > node.cpu:
            raise K8sConfigError(
                f"scaling.cpus_per_worker: {per_pod} worker(s) x {cpus_per_worker:g} + data_cpus "
                f"{data_cpus:g} = {cpu} CPUs exceeds the {node.cpu} of a worker node in overlay "
                f"{profile.name!r}"
            )
    else:
        cpu = max(math.floor(node.cpu * share), math.ceil(per_pod + data_cpus))

    if memory_gb is not None:
        memory_mib = math.ceil(per_pod * memory_gb * 1024)
        if memory_mib > node.memory_mib:
            raise K8sConfigError(
                f"scaling.memory_per_worker_gb: {per_pod} worker(s) x {memory_gb:g} GiB exceeds "
                f"the {node.memory_mib // 1024} GiB of a worker node in overlay {profile.name!r}"
            )
    else:
        memory_mib = math.floor(node.memory_mib * share)
    _check_memory(memory_mib, per_pod, "scaling.memory_per_worker_gb")

    return PodShape(
        replicas=math.ceil(total_workers / per_pod),
        workers_per_pod=per_pod,
        cpu=cpu,
        memory_mib=memory_mib,
        gpus=gpus,
    )


def ray_cluster_spec(
    profile: Overlay, image: str, shape: PodShape, *, run_label: str, config_map: str
) -> dict:
    """The RayCluster spec a rendered RayJob creates: CPU-only head plus one worker group."""
    worker_node = profile.worker
    autoscaling = profile.autoscaler is not None
    group = {
        "groupName": profile.worker_group,
        "replicas": shape.replicas,
        # Without the autoscaler KubeRay requires both bounds; with it, idle workers may go.
        "minReplicas": 0 if autoscaling else shape.replicas,
        "maxReplicas": shape.replicas,
        "rayStartParams": {
            "object-store-memory": str(sizing.object_store_bytes(shape.memory_mib)),
        },
        "template": ray_pod_template(
            image,
            component="ray-worker",
            container="ray-worker",
            cpu=shape.cpu,
            memory_mib=shape.memory_mib,
            gpus=shape.gpus,
            node=worker_node,
            service_account=WORKER_SERVICE_ACCOUNT,
            run_label=run_label,
        ),
    }
    if autoscaling and profile.worker_idle_timeout_s is not None:
        group["idleTimeoutSeconds"] = profile.worker_idle_timeout_s
    spec: dict = {
        "rayVersion": RAY_VERSION,
        # Ray token auth: the operator generates the token Secret and injects it into every
        # Ray container and the submitter, so nothing without it can run code via 8265.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": autoscaling,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {
                # Tasks and train workers never land on the head: it hosts GCS, the
                # dashboard and the job driver, and losing it loses the whole cluster.
                "num-cpus": "0",
                "dashboard-host": "0.0.0.0",
                "object-store-memory": str(sizing.object_store_bytes(profile.head.memory_mib)),
            },
            "template": ray_pod_template(
                image,
                component="ray-head",
                container="ray-head",
                cpu=profile.head.cpu,
                memory_mib=profile.head.memory_mib,
                gpus=0,
                node=profile.head,
                service_account=HEAD_SERVICE_ACCOUNT,
                run_label=run_label,
                config_map=config_map,
                # Only the autoscaler sidecar talks to the API server.
                api_token=autoscaling,
            ),
        },
        "workerGroupSpecs": [group],
    }
    if autoscaling:
        spec["autoscalerOptions"] = copy.deepcopy(profile.autoscaler)
    if profile.gcs_fault_tolerance:
        spec["gcsFaultToleranceOptions"] = copy.deepcopy(profile.gcs_fault_tolerance)
    return spec


def ray_pod_template(
    image: str,
    *,
    component: str,
    container: str,
    cpu: int,
    memory_mib: int,
    gpus: int,
    node: NodeType,
    service_account: str,
    run_label: str | None = None,
    config_map: str | None = None,
    api_token: bool = False,
) -> dict:
    """A restricted-PSS Ray pod: requests == limits, memory-backed /dev/shm, shared volume."""
    quantities = {"cpu": str(cpu), "memory": f"{memory_mib}Mi"}
    if gpus:
        quantities["nvidia.com/gpu"] = str(gpus)
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "shared", "mountPath": SHARED_MOUNT},
    ]
    volumes = [
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": f"{sizing.shm_mib(memory_mib)}Mi"},
        },
        {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_PVC}},
    ]
    if config_map:
        mounts.append({"name": "run-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
        volumes.append({"name": "run-config", "configMap": {"name": config_map}})
    ray_container: dict = {
        "name": container,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
        "volumeMounts": mounts,
    }
    # `s3://` storage stages run records and search experiments locally
    # (stoker.trainer.run_dir): on the shared volume, every node (and a retried job's new
    # driver pod) writes and finds the same staging copy.
    env = [(STAGING_ENV, f"{SHARED_MOUNT}/{STAGING_DIR}"), *node.env]
    ray_container["env"] = [{"name": k, "value": v} for k, v in env]
    labels = {PART_OF[0]: PART_OF[1], "app.kubernetes.io/component": component}
    if run_label:
        labels[RUN_LABEL] = run_label
    pod: dict = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": api_token,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [ray_container],
        "volumes": volumes,
    }
    if node.node_selector:
        pod["nodeSelector"] = dict(node.node_selector)
    if node.tolerations:
        pod["tolerations"] = [dict(t) for t in node.tolerations]
    return {"metadata": {"labels": labels}, "spec": pod}


def submitter_template(image: str, run_label: str) -> dict:
    """The K8sJobMode submitter pod: restricted, and labelled as a dashboard client.

    KubeRay fills in the `ray job submit` command and the auth token env var; it keeps our
    labels, security context and resources. It carries the dashboard-client label but not
    the Ray cluster label, so the NetworkPolicy lets it reach 8265 and nothing else.
    """
    quantities = {"cpu": "500m", "memory": "1Gi"}
    return {
        "metadata": {
            "labels": {
                DASHBOARD_CLIENT[0]: DASHBOARD_CLIENT[1],
                "app.kubernetes.io/component": "job-submitter",
                RUN_LABEL: run_label,
            }
        },
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": SUBMITTER_SERVICE_ACCOUNT,
            "automountServiceAccountToken": False,
            "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {"requests": dict(quantities), "limits": dict(quantities)},
                    "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
                }
            ],
        },
    }


def _overlay(name: str) -> Overlay:
    try:
        return OVERLAYS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(OVERLAYS))
        raise K8sConfigError(f"overlay: unknown overlay {name!r}; known: {known}") from None


def _check_storage(storage: object) -> None:
    if isinstance(storage, str) and "://" in storage:
        return  # s3://, gs://, ...: shared by construction
    path = posixpath.normpath(storage) if isinstance(storage, str) and storage else ""
    if path == SHARED_MOUNT or path.startswith(SHARED_MOUNT + "/"):
        return
    raise K8sConfigError(
        f"storage: {storage!r} is not on the shared volume; use a path under {SHARED_MOUNT} "
        "(or an s3:// URI) so retried jobs resume from their checkpoints"
    )


def _check_memory(memory_mib: int, workers: int, key: str) -> None:
    shm = sizing.shm_mib(memory_mib)
    store = sizing.object_store_bytes(memory_mib) // sizing.MIB
    heap = memory_mib - shm
    if store < sizing.RAY_MIN_OBJECT_STORE_MIB or heap < workers * MIN_WORKER_HEAP_MIB:
        raise K8sConfigError(
            f"{key}: a {memory_mib}Mi worker pod is too small: /dev/shm takes {shm}Mi "
            f"(object store {store}Mi, Ray needs >= {sizing.RAY_MIN_OBJECT_STORE_MIB}Mi), "
            f"leaving {heap}Mi for {workers} worker process(es) (need >= "
            f"{MIN_WORKER_HEAP_MIB}Mi each)"
        )
