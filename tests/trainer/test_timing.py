"""The pass breakdown's arithmetic (stoker.trainer.timing): phases add up, other is the rest."""

import time

from stoker.trainer.timing import StepTimes


def test_step_times_split_a_pass_into_parts_that_sum_to_it():
    times = StepTimes()
    started = time.perf_counter()
    for _ in range(3):
        times.begin()
        time.sleep(0.01)  # "forward+backward"
        times.computed()
        time.sleep(0.005)  # "step"
        times.stepped()
        time.sleep(0.002)  # between steps: neither, so "other"
    total = time.perf_counter() - started
    parts = times.metrics(wait_s=0.0, total_s=total)
    assert parts["time_compute_s"] >= 0.03 and parts["time_step_s"] >= 0.015
    assert parts["time_compute_s"] > parts["time_step_s"]  # not swapped
    assert parts["time_other_s"] >= 0.005
    assert abs(sum(parts.values()) - total) < 1e-9
