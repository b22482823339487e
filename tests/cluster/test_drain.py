"""A node drained mid-epoch on a real two-node Ray cluster (tests/cluster/drain_scenario.py):
the elastic run checkpoints at the next step boundary, goes on with one worker on the node
that remains, grows back to two workers when a new node joins, and has every epoch recorded
once, no step lost or trained twice, and both resizes and the preemption in the registry.
"""

import pytest

from stoker.cluster.registry import Registry
from tests.cluster.drain_scenario import drained_run, epochs_of, steps_of_drained_epoch

pytestmark = pytest.mark.slow

DEADLINE_S = 30  # the issue's figure; Kubernetes' default grace period too
# More than the run gets to: it is stopped at its first epoch back on two nodes, which comes
# when Ray's elastic sizing notices the joined node (its coordinator looks every 20 s), some
# tens of 1-second epochs after the node left.
EPOCHS = 400


def test_a_drained_node_checkpoints_mid_epoch_the_run_goes_on_with_the_node_left_and_grows_back(digits_csv, tmp_path):
    drained = drained_run(digits_csv, tmp_path, EPOCHS, DEADLINE_S, rejoin=True)
    assert drained.code == 130, drained.stderr[-3000:]  # stopped by the test once grown back

    # The drain: one event, its checkpoint mid-epoch, on the drained node's rank; said in one line.
    (event,) = drained.events
    assert event["nodes"] == [drained.worker_node] and len(event["ranks"]) == 1 and event["world_size"] == 2
    assert 0 < event["micro_step"] < event["steps_in_epoch"] and event["checkpoint"]
    said = f"stoker: node {drained.worker_node[:12]} (ranks {event['ranks'][0]}) is being drained, deadline in"
    assert said in drained.stderr
    assert "not counted in train.max_failures" in drained.stderr
    assert "worker rank" not in drained.stderr  # no failure reported, neither at the drain nor at the growth

    # Every epoch once and in order; 2 workers, then 1 from the drained epoch on, then 2 again.
    epochs = epochs_of(drained.records)
    assert [r["epoch"] for r in epochs] == list(range(len(epochs)))
    sizes = [r["world_size"] for r in epochs]
    # The test stops the run once it sees an epoch back at 2 workers; an epoch of a second or
    # less may finish before the stop lands, so the run can end with more than one.
    grown = next((i for i in range(event["epoch"], len(sizes)) if sizes[i] == 2), len(sizes))
    assert set(sizes[:event["epoch"]]) == {2} and set(sizes[event["epoch"]:grown]) == {1}, sizes
    assert event["epoch"] < grown < len(sizes) and set(sizes[grown:]) == {2}, sizes
    taken, expected = steps_of_drained_epoch(drained)
    assert taken == expected
    # Training went on learning through both resizes (benchmarks/elastic.py --metric-gap: the
    # resized run's final accuracy against an uninterrupted one's).
    assert epochs[-1]["val_accuracy"] > 0.9

    # The registry keeps both resizes and the preemption.
    [row] = Registry(f"sqlite:///{drained.project / 'runs' / 'registry.db'}").runs(name="drained")
    assert row.status == "stopped"
    scaling = row.metrics["scaling"]
    assert scaling["workers"] == 2
    assert scaling["resizes"] == [{"epoch": event["epoch"], "workers_from": 2, "workers_to": 1},
                                  {"epoch": grown, "workers_from": 1, "workers_to": 2}]
    assert scaling["preemptions"] == [{"epoch": event["epoch"], "micro_step": event["micro_step"],
                                       "nodes": [drained.worker_node]}]
