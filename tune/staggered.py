"""Trial processes started a few at a time while a search fills its slots.

A search that runs more trials at once than the cluster has CPUs (many short one-process trials,
each reserving a fraction of a CPU) asks Ray for all their processes at once. Each one's start
is CPU-bound (a Python process, Ray, Tune, and a real trial's torch and DeepSpeed), so they
share the CPUs and all come up together, late: measured on 2 CPUs with 16 sleep trials of 1/8
CPU, the first result of the first 16 trials arrived at 13.5-15.8 s, so every slot idled about
14 s (`benchmarks/tune_overhead.py`). Started a few at a time, the first ones run while the
others start.

`StaggeredStart` wraps the search algorithm and caps the trials alive at once at the number that
have reported a first result plus `starting` (one per CPU of the cluster): a trial that goes to
a finished trial's process (reused actors) reports within its first epoch and raises the cap,
so only processes that are still starting hold it back, at most about `starting` of them. Once
as many trials as the search has slots have reported, the cap no longer binds and the wrapped
algorithm alone decides. It only holds back suggestions; every method Tune calls is the
wrapped algorithm's.
"""

from typing import Any

from ray.tune.search import SearchAlgorithm


class StaggeredStart(SearchAlgorithm):
    """A search algorithm whose first `slots` trials start at most `starting` at a time."""

    def __init__(self, search_alg: SearchAlgorithm, starting: int, slots: int) -> None:
        self.search_alg = search_alg
        self.starting = max(1, starting)
        self.slots = slots
        self._live: set[str] = set()  # suggested and not complete
        self._unreported: set[str] = set()  # of those, the ones with no result yet
        self._reported = 0  # trials that have reported (or ended) at least once

    @property
    def searcher(self):
        """The wrapped generator's searcher, where Tune looks for its concurrency limit."""
        return getattr(self.search_alg, "searcher", None)

    def next_trial(self):
        if self._reported < self.slots and len(self._live) >= self._reported + self.starting:
            return None
        trial = self.search_alg.next_trial()
        if trial is not None:
            self._live.add(trial.trial_id)
            self._unreported.add(trial.trial_id)
        return trial

    def _reports(self, trial_id: str) -> None:
        if trial_id in self._unreported:
            self._unreported.discard(trial_id)
            self._reported += 1

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._reports(trial_id)
        self.search_alg.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # A trial that ends (fails) before its first result frees its place, without counting as
        # a running one: its process is gone.
        self._unreported.discard(trial_id)
        self._live.discard(trial_id)
        self.search_alg.on_trial_complete(trial_id, result=result, error=error)

    # Everything else is the wrapped algorithm's.
    @property
    def metric(self):
        return self.search_alg.metric

    @property
    def total_samples(self) -> int:
        return self.search_alg.total_samples

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.search_alg.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, experiments) -> None:
        self.search_alg.add_configurations(experiments)

    def is_finished(self) -> bool:
        return self.search_alg.is_finished()

    def set_finished(self) -> None:
        self.search_alg.set_finished()

    def has_checkpoint(self, dirpath: str) -> bool:
        return self.search_alg.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath: str, **kwargs: Any) -> None:
        self.search_alg.save_to_dir(dirpath, **kwargs)

    def restore_from_dir(self, dirpath: str) -> None:
        self.search_alg.restore_from_dir(dirpath)
