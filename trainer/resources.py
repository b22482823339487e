"""Per-worker resources that leave room for Ray Data.

Ray Data's read tasks need free CPUs. If the Train workers reserve every logical CPU, the read
tasks never get scheduled and every rank waits in `iter_torch_batches` forever, with no error.
So the plan keeps `scaling.data_cpus` free, and refuses a scaling that cannot.
"""

import math
from dataclasses import dataclass

from stoker.errors import UserError
from stoker.trainer.config import ScalingConfig

MIN_CPUS_PER_WORKER = 0.1
"""The smallest CPU share a CPU training worker may get: each is a process with its own copy of
torch and DeepSpeed, and below a tenth of a CPU each one steps so rarely that an epoch never
ends (64 workers on a 2-CPU machine ran for ever)."""


@dataclass(frozen=True)
class ResourcePlan:
    cpus_per_worker: float
    gpus_per_worker: float
    read_task_cpus: float
    """CPUs each Ray Data read task asks for; at most what `data_cpus` keeps free."""


def plan_resources(scaling: ScalingConfig, cluster: dict[str, float]) -> ResourcePlan:
    total_cpus = float(cluster.get("CPU", 0))
    total_gpus = float(cluster.get("GPU", 0))
    # An elastic run needs room for its smallest size now; it grows as the cluster does.
    workers = scaling.min_workers if scaling.elastic else scaling.num_workers
    gpus = scaling.gpus_per_worker if scaling.use_gpu else 0.0
    if gpus and workers * gpus > total_gpus:
        raise UserError(
            f"scaling: {workers} workers x {gpus:g} GPUs need {workers * gpus:g} GPUs; "
            f"the cluster has {total_gpus:g}"
        )
    spare = total_cpus - scaling.data_cpus
    if scaling.cpus_per_worker is None:
        if spare <= 0:
            raise UserError(
                f"scaling.data_cpus: keeping {scaling.data_cpus:g} CPUs for Ray Data leaves none of "
                f"the cluster's {total_cpus:g} CPUs for {workers} workers"
            )
        # Whole CPUs when there are enough; an even fraction on small machines. Rounded down
        # to 1/100 so the sum never exceeds what is free.
        cpus = min(1.0, int(spare / workers * 100) / 100)
        if cpus < MIN_CPUS_PER_WORKER and not gpus:
            raise UserError(
                f"scaling.num_workers: {workers} workers need at least {workers * MIN_CPUS_PER_WORKER:g} CPUs "
                f"({MIN_CPUS_PER_WORKER:g} each) plus {scaling.data_cpus:g} for Ray Data (scaling.data_cpus); "
                f"the cluster has {total_cpus:g} CPUs and {total_gpus:g} GPUs"
            )
        if cpus <= 0:
            raise UserError(
                f"scaling.num_workers: {workers} workers do not fit in the {spare:g} CPUs that "
                f"scaling.data_cpus leaves (cluster: {total_cpus:g} CPUs)"
            )
    else:
        cpus = scaling.cpus_per_worker
        if cpus < MIN_CPUS_PER_WORKER and not gpus:
            raise UserError(
                f"scaling.cpus_per_worker: {cpus:g} CPUs per worker is below the {MIN_CPUS_PER_WORKER:g} a "
                f"CPU training worker needs; the cluster has {total_cpus:g} CPUs and {total_gpus:g} GPUs"
            )
        if workers * cpus > spare + 1e-9:
            fit = int(max(spare, 0) / workers * 100) / 100
            hint = (
                f"set scaling.cpus_per_worker to {fit:g} or fewer"
                if fit > 0 else "use fewer workers or a bigger cluster"
            )
            raise UserError(
                f"scaling.cpus_per_worker: {workers} workers x {cpus:g} CPUs leave "
                f"{max(total_cpus - workers * cpus, 0):g} of the cluster's {total_cpus:g} CPUs for "
                f"Ray Data, which needs {scaling.data_cpus:g} (scaling.data_cpus) or training "
                f"hangs waiting for data; {hint}"
            )
    return ResourcePlan(cpus, gpus, read_task_cpus=min(1.0, scaling.data_cpus))


def can_stream(plan: ResourcePlan, num_workers: int, node_cpus: list[float]) -> bool:
    """Whether Ray Data can read while the workers train: its file listing runs as a task of
    one whole CPU (Ray 2.60, not configurable), so some node must keep a whole CPU free
    however the workers are placed. Otherwise a read started during training (a split that
    is not cached beforehand) waits forever, with no error."""
    per_worker = plan.cpus_per_worker
    for cpus in node_cpus:
        # The most workers this node could be given, and what they would leave.
        fits = num_workers if per_worker <= 0 else min(num_workers, math.floor(cpus / per_worker + 1e-9))
        if cpus - fits * per_worker >= 1 - 1e-9:
            return True
    return False
