"""The pieces of a node drain that need no cluster: the elastic `num_workers: [min, max]`
config, DeepSpeed's batch for the world size a group actually has, the rest of a drained
epoch, and the poll cadence (the drain itself runs on a real two-node cluster in
tests/cluster/test_drain.py)."""

import pytest
import torch
from pydantic import ValidationError

from stoker.trainer.config import ScalingConfig
from stoker.trainer.deepspeed_config import for_world_size, planned_world_size
from stoker.trainer.preemption import DrainWatch, Partial


def test_num_workers_min_max_makes_an_elastic_run_and_bad_ranges_name_the_key():
    elastic = ScalingConfig(num_workers=[1, 3])
    assert (elastic.min_workers, elastic.num_workers, elastic.elastic) == (1, 3, True)
    assert not ScalingConfig(num_workers=2).elastic and not ScalingConfig(num_workers=[2, 2]).elastic
    for bad, says in (([3, 2], "num_workers: [3, 2]: min is larger than max"),
                      ([1], "num_workers: [1] is not [min, max]"), ([1, 2.5], "is not [min, max]"),
                      ([0, 2], "min_workers")):
        with pytest.raises(ValidationError, match=says.replace("[", r"\[").replace("]", r"\]")):
            ScalingConfig(num_workers=bad)


def test_the_deepspeed_batch_follows_the_world_size_and_the_per_worker_batch_stays():
    planned = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2, "train_batch_size": 192}
    assert planned_world_size(planned) == 3
    assert for_world_size(planned, 3) is planned  # as planned: untouched
    shrunk = for_world_size(planned, 1)
    assert shrunk["train_batch_size"] == 64 and shrunk["train_micro_batch_size_per_gpu"] == 32
    assert planned["train_batch_size"] == 192  # the plan itself is not changed


def test_a_drained_epoch_trains_the_share_of_steps_it_had_left_at_any_world_size():
    half = Partial(epoch=4, fraction=0.5, micro_steps=20, world_size=2)
    assert half.remaining(40) == 20 and half.remaining(79) == 39  # at 2 workers, then at 1
    assert Partial(epoch=0, fraction=1.0, micro_steps=5, world_size=1).remaining(5) == 0
    assert Partial.of({"partial": {"epoch": 1, "fraction": 0.25, "micro_steps": 3, "world_size": 2}}).epoch == 1
    assert Partial.of({"epoch": 3}) is None


def test_outside_ray_train_the_watch_turns_itself_off_instead_of_failing():
    watch = DrainWatch(torch.device("cpu"), rank=0)
    assert all(watch.check() is None for _ in range(watch.every))
    assert watch.enabled is False  # get_preemption_info refused: no Ray Train worker here
    assert watch.check() is None


def test_rank_zero_reads_the_stop_flag_without_waiting_for_its_answer(ray_cluster):
    """The flag's answer is read at a later poll once it has arrived; a poll never waits for it
    (an actor call waited for cost every rank 20-50 ms a poll on a loaded machine)."""
    import ray

    @ray.remote(num_cpus=0)
    class SlowFlag:  # the StopFlag's interface, answering only when told to
        def __init__(self) -> None:
            self.raised, self.answer = False, False

        def set(self, raised: bool, answer: bool) -> None:
            self.raised, self.answer = raised, answer

        async def is_set(self) -> bool:
            import asyncio

            while not self.answer:
                await asyncio.sleep(0.01)
            return self.raised

    flag = SlowFlag.options(name="stoker-test-slow-flag").remote()
    try:
        watch = DrainWatch(torch.device("cpu"), rank=0, stop_flag="stoker-test-slow-flag")
        assert watch._stop_asked() is False  # asked; nothing to read yet
        asked = watch._asked
        assert watch._stop_asked() is False and watch._asked is asked  # not answered: no wait, no second ask
        ray.get(flag.set.remote(True, True))
        ray.get(asked)
        assert watch._stop_asked() is True  # the answer, read at the poll after it arrived
        assert DrainWatch(torch.device("cpu"), rank=1, stop_flag="stoker-test-slow-flag")._stop_asked() is False
    finally:
        ray.kill(flag)
