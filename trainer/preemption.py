"""Node drains seen from the training loop: when Ray reports that a node of the run is being
drained (a spot reclaim, a Kubernetes node drain, `ray drain-node`), every rank saves a
checkpoint at the next step boundary and then waits for Ray Train to tear the group down at
the drain's deadline and start it again on the nodes that remain (a preemption, which Ray
counts against `FailureConfig.max_preemption_failures`, unlimited, not `train.max_failures`).

Waiting instead of training on: the steps after the checkpoint would be lost with the node
anyway, so a drain costs at most the steps between two polls. The restart resumes mid-epoch
from that checkpoint (`Partial`), at whatever world size the cluster then holds.

A stop of the run (SIGTERM from a scheduler, Kueue's suspend, `stoker jobs stop`, Ctrl-C)
takes the same path: the driver raises its `StopFlag` (stoker.trainer.stop_flag), which rank 0
reads at the same polls; every rank checkpoints and the workers end, and the next `stoker train`
resumes mid-epoch from there.

`ray.train.get_preemption_info()` is a barrier across the ranks (Ray agrees on rank 0's view)
and costs about 5 ms, too much for every step of a fast model: it is polled every `every`
micro-steps, a cadence that rank 0 re-times after each poll towards one poll a second and
broadcasts, so every rank polls at the same steps.
"""

import time
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
import torch.distributed as dist

POLL_EVERY_S = 1.0
"""Target seconds between two polls: Ray's drain watcher itself polls every 5 s, and a
deadline is typically 30 s (Kubernetes' grace period) to 2 minutes (cloud spot notices)."""
_MAX_EVERY = 4096


@dataclass(frozen=True)
class StopRequest:
    """What a poll returns when the driver asked the run to stop (read like a drain's info)."""

    deadline_ms: int | None = None
    preempted_node_ids: tuple[str, ...] = ()
    preempted_ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class Partial:
    """Where in an epoch a just-in-time checkpoint was taken (kept in its training state)."""

    epoch: int
    fraction: float
    """Share of the epoch's micro-steps already trained (0-1): a resume at another world size
    trains the rest of the epoch's steps at that size."""
    micro_steps: int
    world_size: int

    def remaining(self, steps_in_epoch: int) -> int:
        """Micro-steps still to train of this epoch at a world size with `steps_in_epoch`."""
        return max(steps_in_epoch - round(self.fraction * steps_in_epoch), 0)

    @classmethod
    def of(cls, state: dict[str, Any]) -> "Partial | None":
        found = state.get("partial")
        return cls(**found) if found else None


class DrainWatch:
    """Polls for a node drain at agreed micro-steps; `check()` is called after every step."""

    def __init__(self, device: torch.device, rank: int, stop_flag: str | None = None) -> None:
        self.device, self.rank = device, rank
        # Rank 0 alone asks the driver's flag and tells the others.
        self._flag = ray.get_actor(stop_flag) if stop_flag and rank == 0 else None
        self._asked = None  # the flag's answer on its way (an ObjectRef), read at a later poll
        self.every = 8  # until the first poll has timed a few steps
        self._countdown = self.every
        self._last = time.perf_counter()
        self.enabled = True

    def check(self) -> Any | None:
        """The drain's `PreemptionInfo` when one was reported at this step, else None."""
        if not self.enabled:
            return None
        self._countdown -= 1
        if self._countdown > 0:
            return None
        try:
            info = ray.train.get_preemption_info()
        except (DeprecationWarning, RuntimeError):
            # A trial inside a Tune session (stoker's in-process trials) or outside Ray Train:
            # there is no drain watcher to ask. The same on every rank, so no barrier is missed.
            self.enabled = False
            return None
        stop = self._stop_asked()
        now = time.perf_counter()
        wanted = self.every * POLL_EVERY_S / max(now - self._last, 1e-6)
        # At most twice as far apart each time: a burst of fast steps (no validation or
        # checkpoint in between) would otherwise stretch the next interval to many epochs.
        wanted = min(wanted, 2 * self.every, _MAX_EVERY)
        agreed = torch.tensor([max(round(wanted), 1), int(stop)], dtype=torch.long, device=self.device)
        if dist.is_initialized():
            dist.broadcast(agreed, src=0)  # sync: rank 0's timing and flag decide, so all ranks agree
        self.every = self._countdown = int(agreed[0])
        self._last = now
        if int(agreed[1]):
            return StopRequest()
        return info

    def _stop_asked(self) -> bool:
        """Whether the driver's flag was raised, as of its last answer; never waits for one.

        An actor call waited for here cost 20-50 ms a poll on a loaded 2-CPU machine (the flag's
        process must be scheduled), and every other rank waited with rank 0 in the broadcast:
        about 5% of a fast model's epoch (benchmarks/train_throughput.py). So the question is
        sent at one poll and its answer read at the next one it has arrived by: a stop is seen
        a poll (about `POLL_EVERY_S`) later, against the driver's `STOP_WAIT_S`."""
        if self._flag is None:
            return False
        raised = False
        if self._asked is not None:
            ready, _ = ray.wait([self._asked], timeout=0)
            if not ready:
                return False
            raised = bool(ray.get(self._asked))
        self._asked = self._flag.is_set.remote()
        return raised


def wait_for_teardown() -> None:
    """Block until Ray Train stops this worker at the drain's deadline (it kills the actor)."""
    while True:
        time.sleep(1.0)
