"""SearchProgressLog keeps the best result so far by the one "is better" (`ranking.improves`): the
first of equal values stays, NaN and non-numbers never win."""

import math
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
