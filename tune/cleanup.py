"""Release the placement groups of trials that a scheduler stopped, and what Tune would keep of
every finished trial for the rest of the search (`ForgetFinishedStatistics`).

A Train V2 trial's workers sit in a placement group that its controller actor creates. When Tune
stops the trial it kills the trainable, which takes the controller and workers with it; but Ray
keeps a non-detached placement group until its creator actor *and* its job are both dead, and
the job is the search driver. So without this, every stopped trial would keep its workers' CPUs
reserved until the whole search ends, and later trials would wait for them.
"""

import time

import ray
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

from stoker.ray_internals import PLACEMENT_GROUP_REMOVED as _REMOVED
from stoker.ray_internals import forget_trial_statistics, placement_groups


def release_orphaned_placement_groups() -> int:
    """Remove live placement groups whose creator actor is dead; return how many."""
    # ray.util.placement_group_table() leaves out who created a group; the GCS record has it.
    removed = 0
    for info in placement_groups():
        # Groups created by a driver (Tune's own per-trial groups among them) have no creator
        # actor and count as "creator actor dead" from the start: never touch those.
        if info.state == _REMOVED or info.is_detached or not info.creator_actor_dead:
            continue
        if not info.creator_actor_id or ray.ActorID(info.creator_actor_id).is_nil():
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
            removed += 1
        except Exception:  # noqa: BLE001 - removed concurrently by its owner's shutdown
            pass
    return removed


def _actor_created_groups_alive() -> int:
    alive = 0
    for info in placement_groups():
        if info.state != _REMOVED and not info.is_detached and info.creator_actor_id \
                and not ray.ActorID(info.creator_actor_id).is_nil():
            alive += 1
    return alive


def release_after_search(timeout_s: float = 30.0) -> None:
    """After a search: the last stopped trials' controllers may still be dying; wait for them
    and release what they leave, so nothing of the search stays reserved."""
    deadline = time.monotonic() + timeout_s
    while True:
        release_orphaned_placement_groups()
        if not _actor_created_groups_alive() or time.monotonic() > deadline:
            return
        time.sleep(0.5)


class ReleaseStoppedTrials(Callback):
    """During a search: releases a stopped trial's placement group once its controller has
    died, which happens a moment after Tune reports the trial done, so the group is looked for
    over the next 10 s (throttled to every 2 s: it reads the GCS's placement-group table, and
    Tune's steps can be milliseconds apart); and once more when the search ends."""

    def __init__(self) -> None:
        self.due, self.until, self.released_at = False, 0.0, 0.0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.due = True

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.due = True

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if self.due:
            self.until, self.due = now + 10, False
        if now < self.until and now - self.released_at >= 2.0:
            self.released_at = now
            release_orphaned_placement_groups()

    def on_experiment_end(self, trials, **info) -> None:
        release_orphaned_placement_groups()


class ForgetFinishedStatistics(Callback):
    """Drop each finished trial's running statistics of its metrics
    (`stoker.ray_internals.forget_trial_statistics`): most of the driver's memory per trial,
    which at 10,000 trials would be about 150 MB. Every search has it."""

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        forget_trial_statistics(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        forget_trial_statistics(trial)
