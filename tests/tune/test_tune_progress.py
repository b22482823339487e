"""SearchProgressLog keeps the best result so far by the one "is better" (`ranking.improves`): the
first of equal values stays, NaN and non-numbers never win."""

import math
import pickle
from types import SimpleNamespace

from stoker.tune.progress import SearchProgressLog


def _feed(mode: str, values) -> tuple[float, str] | None:
    progress = SearchProgressLog("val_loss", mode, emit=lambda line: None)
    for index, value in enumerate(values):
        progress.on_trial_result(0, [], SimpleNamespace(trial_id=f"t{index}"), {"val_loss": value})
    return progress.best


def test_the_best_so_far_is_the_first_of_equal_values_and_never_a_nan_or_a_string():
    assert _feed("min", [0.5, 0.3, 0.3, math.nan, "x", 0.4]) == (0.3, "t1")
    assert _feed("max", [0.5, 0.7, 0.7, 0.6]) == (0.7, "t1")
    assert _feed("max", [None, "x"]) is None


def test_unfinished_trials_are_those_tune_has_not_reported_ended_resumed_ones_included():
    def trial(tid: str, status: str) -> SimpleNamespace:
        return SimpleNamespace(trial_id=tid, status=status, last_result={}, path=f"/x/{tid}")

    progress = SearchProgressLog("val_loss", "min", emit=print)  # (a lambda does not pickle)
    # A resumed search: a and e ended under the earlier driver; b runs; c waits.
    trials = [trial("a", "TERMINATED"), trial("e", "ERROR"), trial("b", "RUNNING"), trial("c", "PENDING")]
    progress.on_step_end(0, trials)
    assert progress.unfinished == ["b", "c"]
    progress.on_trial_complete(0, trials, trials[2])
    trials.append(trial("d", "PENDING"))  # Tune adds trials to the list it steps with
    progress.on_step_end(1, trials)
    progress.on_trial_error(1, trials, trials[3])
    # Interrupted: Tune's clean-up marks the trials it stops TERMINATED without reporting an end.
    trials[4].status = "TERMINATED"
    assert progress.unfinished == ["d"]
    assert pickle.loads(pickle.dumps(progress)).unfinished == []  # pickled with the search, not its trials
