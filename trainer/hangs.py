"""Hung collectives: each training worker's collectives are bounded by
`train.collective_timeout_s`, and one that times out fails the attempt with one line naming the
ranks that did not arrive; Ray Train then restarts the workers from the latest checkpoint
(`train.max_failures`), as after any worker error.

Three kinds of collective, three bounds: Ray Train's world process group (the metric gathers,
the NaN check, the epoch decisions) takes `TorchConfig(timeout_s)` (stoker.trainer.run);
DeepSpeed's own groups (the gradient all-reduce) take torch's default for new groups, set here
before DeepSpeed builds them; Ray Train's report barrier takes RAY_TRAIN_COLLECTIVE_TIMEOUT_S
(stoker.ray_internals). A timed-out collective says only that it timed out, so the ranks that
did not arrive are found with torch's `monitored_barrier` (gloo) on a group of its own, created
at start and idle until then: rank 0 waits for every rank there and names the missing ones.
"""

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import ray
import torch.distributed as dist
from torch.distributed import distributed_c10d

# Live ranks reach the roll call within seconds of each other (they time out in the same
# collective); a rank missing after this long is not coming.
ROLL_CALL_S = 30.0

_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_MISSING = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")

# (node IP, pid) of every rank of this worker group, gathered once at start (one Train worker
# per process); the straggler lines name ranks with it too.
_peers: list[tuple[str, int]] = []


def bound_new_process_groups(seconds: float) -> None:
    """Before DeepSpeed builds its process groups: a `torch.distributed.new_group` given no
    timeout takes torch's module default (30 minutes for gloo, 10 for NCCL), not the world
    group's that Ray Train set from `TorchConfig(timeout_s)`; DeepSpeed creates its
    data-parallel group, a clone of the world group that carries every gradient all-reduce,
    so (deepspeed.utils.groups). torch reads the default from these module globals each time a
    group is created."""
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if getattr(distributed_c10d, name) is not None:  # None: a torch built without NCCL
            setattr(distributed_c10d, name, timedelta(seconds=seconds))


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within `train.collective_timeout_s`."""


def rank_name(rank: int) -> str:
    """`rank 1 (node 10.0.0.7, pid 4242)`: where to look (py-spy dump) when that rank hangs."""
    if rank < len(_peers):
        ip, pid = _peers[rank]
        return f"rank {rank} (node {ip}, pid {pid})"
    return f"rank {rank}"


def missing_ranks(message: str) -> list[int] | None:
    """The ranks a failed `monitored_barrier` names, or None when it names none."""
    found = _MISSING.search(message)
    return [int(r) for r in found.group(1).replace(" ", "").split(",") if r] if found else None


def timeout_message(timeout_s: float, missing: list[int]) -> str:
    names = ", ".join(rank_name(r) for r in missing)
    return (f"a collective did not complete within {timeout_s:g} s (train.collective_timeout_s): "
            f"{names} did not arrive")


@contextmanager
def bounded_collectives(timeout_s: float) -> Iterator[None]:
    """Around a training worker's loop: bound every collective it runs, and turn a timed-out
    one into `CollectiveTimeout` naming the ranks that did not arrive."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    bound_new_process_groups(timeout_s)
    roll_call = dist.new_group(backend="gloo", timeout=timedelta(seconds=min(timeout_s, ROLL_CALL_S)))
    peers: list = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (ray.util.get_node_ip_address(), os.getpid()), group=roll_call)
    _peers[:] = [tuple(p) for p in peers]
    try:
        yield
    except Exception as error:
        if not _TIMED_OUT.search(str(error)):
            raise  # a rank that failed on its own, or a victim of the teardown
        missing = _absent(roll_call, min(timeout_s, ROLL_CALL_S))
        if not missing:
            raise
        raise CollectiveTimeout(timeout_message(timeout_s, missing)) from error


def _absent(roll_call, wait_s: float) -> list[int] | None:
    """After a timeout: the ranks that do not reach the roll call. Rank 0 names them; another
    rank learns only that rank 0 did not answer (then rank 0 is the one hung)."""
    try:
        dist.monitored_barrier(group=roll_call, timeout=timedelta(seconds=wait_s), wait_all_ranks=True)
    except RuntimeError as failed:
        if dist.get_rank() == 0:
            return missing_ranks(str(failed))
        return [0] if _TIMED_OUT.search(str(failed)) else None
    return None  # everyone arrived: nobody is hung
