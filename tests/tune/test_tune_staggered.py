"""More trials at once than CPUs: trial processes start a few at a time (stoker.tune.staggered)."""

from types import SimpleNamespace

from ray.tune.search import SearchAlgorithm

from stoker.tune.staggered import StaggeredStart


class Endless(SearchAlgorithm):
    """Suggests trials t0, t1, ... and records what Tune tells it."""

    def __init__(self) -> None:
        self.made, self.told, self.saved = 0, [], None

    def next_trial(self):
        self.made += 1
        return SimpleNamespace(trial_id=f"t{self.made - 1}")

    def on_trial_result(self, trial_id, result):
        self.told.append(("result", trial_id))

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append(("complete", trial_id, error))

    def save_to_dir(self, dirpath, **kwargs):
        self.saved = dirpath


def suggest(search: StaggeredStart) -> list[str]:
    got = []
    while len(got) < 20 and (trial := search.next_trial()) is not None:  # 20: no cap at all
        got.append(trial.trial_id)
    return got


def test_trials_start_as_many_at_a_time_as_cpus_until_every_slot_has_reported():
    inner = Endless()
    search = StaggeredStart(inner, starting=2, slots=4)
    assert suggest(search) == ["t0", "t1"]  # two processes starting, nothing reported yet
    search.on_trial_result("t0", {})
    assert suggest(search) == ["t2"]  # t0 runs: one more may start
    search.on_trial_result("t0", {})  # a second result of the same trial frees nothing
    assert suggest(search) == []
    search.on_trial_complete("t1", error=True)  # failed before its first result: its place is free
    assert suggest(search) == ["t3"]
    search.on_trial_complete("t0", {})  # t0's process goes to the next trial
    assert suggest(search) == ["t4"]
    search.on_trial_result("t2", {})
    assert suggest(search) == ["t5"]  # t0 and t2 have reported (t1 failed first): 2 + 2 alive at most
    for trial in ("t3", "t4"):
        search.on_trial_result(trial, {})
    # Four trials have reported: the cap no longer binds, the wrapped algorithm alone decides.
    assert all(search.next_trial() is not None for _ in range(10)) and inner.made == 16
    # Everything Tune tells the wrapper reaches the wrapped algorithm, in order.
    assert inner.told[:4] == [("result", "t0"), ("result", "t0"), ("complete", "t1", True), ("complete", "t0", False)]
    search.save_to_dir("/x")
    assert inner.saved == "/x"
