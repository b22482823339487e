"""ASHA over 2-worker trials: each trial is a real TorchTrainer whose workers sit in a placement
group that its Train controller creates. Ray keeps such a group until its creator *and* the
search driver's job are dead, so a trial that ASHA stops leaves its workers' CPUs reserved for
the rest of the search unless stoker releases them (stoker.tune.cleanup). One-worker trials run
in-process and make no group at all: only multi-worker trials can show a leak."""

import pytest
import ray

from stoker.config import parse_config
from stoker.ray_internals import PLACEMENT_GROUP_REMOVED, placement_groups
from stoker.tune.runner import search
from tests.tune.test_tune_e2e import small

pytestmark = pytest.mark.slow

CPUS_PER_WORKER = 0.25


def created_by_actor(info) -> bool:
    """A group an actor created (a Train controller); Tune's own per-trial groups come from the
    driver and have no creator actor."""
    return bool(info.creator_actor_id) and not ray.ActorID(info.creator_actor_id).is_nil()


def groups_since(known: set[bytes]) -> list:
    """The GCS's records (removed ones included) of the placement groups made after `known`."""
    return [info for info in placement_groups() if info.placement_group_id not in known]


def test_asha_over_two_worker_trials_stops_bad_ones_and_leaves_no_placement_group(ray_cluster, prepared, tmp_path):
    # Grid order, one trial at a time: the good lr sets ASHA's first rung, each later (bad) lr
    # is stopped there after one epoch, and the last trial to end is a stopped one.
    # The time budget (about three times what the search takes here) turns a leak that starves later
    # trials of CPUs, which hangs the search, into a failure of the assertions below.
    tune = {"num_samples": 1, "max_concurrent_trials": 1, "searcher": "grid", "time_budget_s": 300,
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "space": {"train.optimizer.lr": {"dist": "grid", "values": [0.01, 1e-5, 2e-5]}}}
    config = small(prepared, tmp_path, "asha-workers", tune, epochs=3)
    # Two workers at a quarter CPU each: a real placement group per trial, and one of the
    # session cluster's two CPUs left for Ray Data's read tasks.
    config["scaling"] = {"num_workers": 2, "cpus_per_worker": CPUS_PER_WORKER, "data_cpus": 1}
    run = parse_config(config, "test")
    known = {info.placement_group_id for info in placement_groups()}

    lines, live_at_trial_end = [], []

    def emit(line: str) -> None:
        lines.append(line)
        if line.startswith("trial "):  # a trial just ended (on Tune's own thread, mid-search)
            live = [info for info in groups_since(known) if created_by_actor(info) and info.state != PLACEMENT_GROUP_REMOVED]
            live_at_trial_end.append(len(live))

    outcome = search(run, emit=emit, status_interval_s=5)

    table = outcome.table
    assert list(table["train.optimizer.lr"]) == pytest.approx([0.01, 1e-5, 2e-5]), table
    # ASHA stopped both bad trials at its first rung; the good one trained to the end.
    assert list(table["status"]) == ["completed", "stopped", "stopped"], table
    assert list(table["epochs"]) == [3, 1, 1], table
    assert sum("stopped early after 1 epochs" in line for line in lines) == 2, lines
    # Measured here: 0.88 for lr 0.01 after 3 epochs; 0.04 for the bad ones after 1.
    assert table.loc[0, "val_accuracy"] > 0.8 and table.loc[1:, "val_accuracy"].max() < 0.3, table

    groups = groups_since(known)
    workers = [info for info in groups if created_by_actor(info)]
    # Every trial launched its TorchTrainer, whose controller made one group of two worker
    # bundles and had it placed: the leak this test looks for could have happened.
    assert len(workers) == len(table), workers
    for info in workers:
        assert [dict(bundle.unit_resources) for bundle in info.bundles] == [{"CPU": CPUS_PER_WORKER}] * 2, info
        assert info.placement_group_final_bundle_placement_timestamp_ms > 0, info
    # While the search ran, a stopped trial's workers were freed before the next trial ended:
    # at each trial's end at most that trial's own group (its controller still dying) was alive.
    assert len(live_at_trial_end) == len(table) and max(live_at_trial_end) <= 1, live_at_trial_end
    # After the search, nothing it made (worker groups, Tune's per-trial groups) is reserved.
    left = [info for info in groups if info.state != PLACEMENT_GROUP_REMOVED]
    assert not left, left
