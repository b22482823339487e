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


def tune_starts(search: StaggeredStart, trial_id: str) -> None:
    search.callback.on_trial_start(iteration=0, trials=[], trial=SimpleNamespace(trial_id=trial_id))


def test_new_processes_start_as_many_at_a_time_as_cpus_and_reused_ones_are_never_held_back():
    inner = Endless()
    search = StaggeredStart(inner, starting=2)
    assert suggest(search) == ["t0", "t1"]  # two processes coming up
    tune_starts(search, "t0")
    assert suggest(search) == ["t2"]  # t0's process is up: one more may start
    search.on_trial_result("t0", {})  # a result of a trial already started frees nothing
    assert suggest(search) == []
    search.on_trial_complete("t1", error=True)  # failed before it started: its process is gone
    assert suggest(search) == ["t3"]  # ... so the next trial needs a new one
    search.on_trial_complete("t0", {})
    # t0's process is free: the next trial takes it although two processes are still coming up.
    assert suggest(search) == ["t4"]
    search.on_trial_result("t2", {})  # a first result also says the process is up
    assert suggest(search) == ["t5"]
    for trial in ("t3", "t4", "t5"):
        tune_starts(search, trial)
    assert suggest(search) == ["t6", "t7"]
    # Everything Tune tells the wrapper reaches the wrapped algorithm, in order.
    assert inner.told == [("result", "t0"), ("complete", "t1", True), ("complete", "t0", False), ("result", "t2")]
    search.save_to_dir("/x")
    assert inner.saved == "/x"
