"""Quiet live progress (and the release of stopped trials' placement groups): one line per finished trial, and a status line at most every
`interval_s` seconds (running / done / stopped early / errored, best so far). Quiet enough for
logs of searches with thousands of trials, where Tune's own table would scroll forever."""

import time
from collections.abc import Callable

from ray.tune import Callback

from stoker.trainer.ranking import improves
from stoker.tune.cleanup import release_orphaned_placement_groups
from stoker.tune.results import epochs_run


class QuietProgress(Callback):
    def __init__(self, metric: str, mode: str, max_epochs: int | None = None, interval_s: float = 30.0,
                 emit: Callable[[str], None] = print, release_groups: bool = True) -> None:
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.release_groups = release_groups
        self.interval_s, self.emit = interval_s, emit
        self.best: tuple[float, str] | None = None
        self.last_status = time.monotonic()
        self.started = time.monotonic()
        self.release_due, self.release_until, self.released_at = False, 0.0, 0.0
        self.unfinished: list[str] = []
        """Trials running, pending or paused after Tune's last step. Tune steps until every
        trial has finished (a time budget stops them all first) unless it is interrupted
        (Ctrl-C, SIGUSR1); its clean-up then marks the trials it stops TERMINATED, so they are
        read here, before it."""

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and improves(value, None if self.best is None else self.best[0], self.mode):
            self.best = (float(value), trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.release_due = True
        result = trial.last_result or {}
        epochs = epochs_run(result)
        stopped = self.max_epochs is not None and epochs < self.max_epochs
        verb = "stopped early" if stopped else "done"
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, int | float) else "-"
        self.emit(f"trial {trial.trial_id} {verb} after {epochs} epochs: {self.metric} {shown}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.release_due = True
        self.emit(f"trial {trial.trial_id} failed: see {trial.path}/error.txt")

    def on_step_end(self, iteration, trials, **info) -> None:
        self.unfinished = [t.trial_id for t in trials if t.status in ("RUNNING", "PENDING", "PAUSED")]
        now = time.monotonic()
        # A stopped trial's controller dies a moment after Tune reports the trial done, so
        # look for its placement group for a few seconds after each trial ends.
        if self.release_due:
            self.release_until, self.release_due = now + 10, False
        if self.release_groups and now < self.release_until and now - self.released_at >= 2.0:
            # Throttled: it reads the GCS's placement-group table, and steps can be milliseconds.
            self.released_at = now
            release_orphaned_placement_groups()
        if now - self.last_status >= self.interval_s:
            self.last_status = now
            self.emit(self.status(trials))

    def on_experiment_end(self, trials, **info) -> None:
        if self.release_groups:
            release_orphaned_placement_groups()
        self.emit(self.status(trials))

    def status(self, trials) -> str:
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        parts = [f"{counts.get(s, 0)} {s.lower()}" for s in ("RUNNING", "PENDING", "PAUSED", "TERMINATED", "ERROR") if counts.get(s)]
        best = f"; best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else ""
        return f"[{time.monotonic() - self.started:6.0f}s] {', '.join(parts) or 'no trials'}{best}"
