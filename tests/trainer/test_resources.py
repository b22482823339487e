"""The CPU plan that keeps Ray Data's readers schedulable next to the Train workers."""

import pytest

from stoker.errors import UserError
from stoker.trainer.config import ScalingConfig
from stoker.trainer.resources import plan_resources


def test_two_workers_on_two_cpus_leave_one_for_data():
    plan = plan_resources(ScalingConfig(num_workers=2), {"CPU": 2.0})
    assert plan.cpus_per_worker == 0.5
    assert 2 * plan.cpus_per_worker + plan.read_task_cpus <= 2.0


def test_big_cluster_gives_whole_cpus():
    plan = plan_resources(ScalingConfig(num_workers=4), {"CPU": 64.0})
    assert plan.cpus_per_worker == 1.0


def test_uneven_share_rounds_down():
    plan = plan_resources(ScalingConfig(num_workers=3), {"CPU": 2.0})
    assert plan.cpus_per_worker == 0.33
    assert 3 * plan.cpus_per_worker <= 1.0


def test_workers_taking_every_cpu_are_refused_with_the_fix():
    with pytest.raises(UserError) as info:
        plan_resources(ScalingConfig(num_workers=2, cpus_per_worker=1), {"CPU": 2.0})
    message = str(info.value)
    assert message.startswith("scaling.cpus_per_worker: 2 workers x 1 CPUs leave 0 of the cluster's 2 CPUs")
    assert "set scaling.cpus_per_worker to 0.5 or fewer" in message


def test_no_cpu_left_for_workers():
    with pytest.raises(UserError, match="scaling.data_cpus: keeping 2 CPUs for Ray Data leaves none"):
        plan_resources(ScalingConfig(num_workers=1, data_cpus=2), {"CPU": 2.0})


def test_gpus_beyond_the_cluster_say_what_it_has():
    with pytest.raises(UserError, match=r"scaling: 2 workers x 1 GPUs need 2 GPUs; the cluster has 0"):
        plan_resources(ScalingConfig(num_workers=2, use_gpu=True), {"CPU": 8.0})
    plan = plan_resources(ScalingConfig(num_workers=2, use_gpu=True), {"CPU": 8.0, "GPU": 2.0})
    assert plan.gpus_per_worker == 1


def test_reads_during_training_need_a_node_with_a_whole_cpu_left_wherever_workers_land():
    from stoker.trainer.resources import can_stream

    half = plan_resources(ScalingConfig(num_workers=2, cpus_per_worker=0.5, data_cpus=0.5), {"CPU": 2.0})
    # One 2-CPU node: both workers on it still leave one CPU.
    assert can_stream(half, 2, [2.0])
    # Two 1-CPU nodes (the multi-node test's cluster): each node can hold both workers, or one
    # and half a CPU: never a whole CPU free, so reads during training would never start.
    assert not can_stream(half, 2, [1.0, 1.0])
    # A node too small for a worker keeps its CPU.
    assert can_stream(plan_resources(ScalingConfig(num_workers=2, cpus_per_worker=1.5, data_cpus=0.5), {"CPU": 4.0}),
                      2, [3.0, 1.0])
    assert not can_stream(plan_resources(ScalingConfig(num_workers=2, cpus_per_worker=1.5, data_cpus=0.5), {"CPU": 4.0}),
                          2, [3.5, 0.5])


def test_more_workers_than_the_cluster_can_run_are_refused_saying_what_it_has():
    with pytest.raises(UserError) as info:
        plan_resources(ScalingConfig(num_workers=64), {"CPU": 2.0})
    assert str(info.value) == (
        "scaling.num_workers: 64 workers need at least 6.4 CPUs (0.1 each) plus 1 for Ray Data "
        "(scaling.data_cpus); the cluster has 2 CPUs and 0 GPUs"
    )
    with pytest.raises(UserError, match="0.01 CPUs per worker is below the 0.1"):
        plan_resources(ScalingConfig(num_workers=64, cpus_per_worker=0.01), {"CPU": 2.0})
    assert plan_resources(ScalingConfig(num_workers=10), {"CPU": 2.0}).cpus_per_worker == 0.1
