"""Trial processes started a few at a time while a search fills its slots.

A search that runs more trials at once than the cluster has CPUs (many short one-process trials,
each reserving a fraction of a CPU) asks Ray for all their processes at once. Each one's start
is CPU-bound (a Python process, Ray, Tune, and a real trial's torch and DeepSpeed), so they
share the CPUs and all come up together, late: measured on 2 CPUs with 16 sleep trials of 1/8
CPU, the first result of the first 16 trials arrived at 13.5-15.8 s, so every slot idled about
14 s (`benchmarks/tune_overhead.py`). Started a few at a time, the first ones run while the
others start.

`StaggeredStart` wraps the search algorithm and counts the processes the search has asked for.
With reused actors a trial needs a new process only when more trials are alive than ever before
(otherwise it takes a finished trial's process), so those are the trials it holds back while
`starting` (one per CPU of the cluster) new processes are still coming up; a trial that goes to
an existing process is never held back. A process has come up when Tune starts its trial
(`callback`, which `launch` registers with the wrapper) or, failing that, when the trial
reports. The wrapped algorithm keeps its own concurrency limit. The wrapper only holds back
suggestions; every method Tune calls is the wrapped algorithm's.
"""

from typing import Any

from ray import tune
from ray.tune.search import SearchAlgorithm


class StaggeredStart(SearchAlgorithm):
    """A search algorithm whose trials start at most `starting` new processes at a time."""

    def __init__(self, search_alg: SearchAlgorithm, starting: int) -> None:
        self.search_alg = search_alg
        self.starting = max(1, starting)
        self._live: set[str] = set()  # suggested and not complete
        self._processes = 0  # trial processes asked for: the most trials alive at once
        self._coming_up: set[str] = set()  # trials waiting for a new process
        self.callback = _TrialStarts(self)
        """Register with the search's callbacks: tells the wrapper when a trial's process is up."""

    @property
    def searcher(self):
        """The wrapped generator's searcher, where Tune looks for its concurrency limit."""
        return getattr(self.search_alg, "searcher", None)

    def next_trial(self):
        needs_process = len(self._live) >= self._processes
        if needs_process and len(self._coming_up) >= self.starting:
            return None
        trial = self.search_alg.next_trial()
        if trial is not None:
            self._live.add(trial.trial_id)
            if needs_process:
                self._processes += 1
                self._coming_up.add(trial.trial_id)
        return trial

    def started(self, trial_id: str) -> None:
        """The trial runs in a process that is up."""
        self._coming_up.discard(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.started(trial_id)
        self.search_alg.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._live:
            self._live.discard(trial_id)
            self._coming_up.discard(trial_id)
            # Tune does not reuse the process of a trial that failed: the next one needs its own.
            if error:
                self._processes -= 1
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


class _TrialStarts(tune.Callback):
    """Tells a `StaggeredStart` that Tune started a trial: its process (new or reused) is up."""

    def __init__(self, staggered: StaggeredStart) -> None:
        self.staggered = staggered

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.staggered.started(trial.trial_id)
