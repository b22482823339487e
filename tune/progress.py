"""Quiet live progress: one line per finished trial, and a status line at most every
`interval_s` seconds (running / done / stopped early / errored, best so far). Quiet enough for
logs of searches with thousands of trials, where Tune's own table would scroll forever.

The same counts go to the experiment's `progress.json` (`SearchProgress`, every few seconds and
at the end), which `stoker jobs status` reads for a submitted search."""

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from ray.tune import Callback

from stoker.atomic import write_json
from stoker.trainer.ranking import improves
from stoker.tune.results import epochs_run

PROGRESS_FILE = "progress.json"
WRITE_EVERY_S = 5.0


class SearchProgress(TypedDict):
    """progress.json in a search's experiment directory: its trials so far."""

    running: int
    """Trials running, pending or paused."""
    done: int
    """Trials that trained every epoch."""
    stopped: int
    """Trials the scheduler stopped early."""
    errored: int
    best: float | None
    """The best value of the search's metric reported so far."""
    best_trial: str | None
    metric: str
    elapsed_s: float


def read_progress(experiment: Path) -> SearchProgress | None:
    """A search's progress.json; None before its first write (or half-written: it never is)."""
    try:
        return json.loads((experiment / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def progress_line(progress: SearchProgress) -> str:
    """`12 done, 3 stopped early, 2 running; best val_accuracy 0.9712 (trial ab12)`."""
    parts = [f"{progress[k]} {word}" for k, word in (("done", "done"), ("stopped", "stopped early"),
                                                      ("errored", "errored"), ("running", "running")) if progress[k]]
    best = f"; best {progress['metric']} {progress['best']:.4f} (trial {progress['best_trial']})" \
        if progress["best"] is not None else ""
    return (", ".join(parts) or "no trials yet") + best


class SearchProgressLog(Callback):
    def __init__(self, metric: str, mode: str, max_epochs: int | None = None, interval_s: float = 30.0,
                 emit: Callable[[str], None] = print, experiment: Path | None = None) -> None:
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.experiment, self.written_at = experiment, 0.0
        self.interval_s, self.emit = interval_s, emit
        self.best: tuple[float, str] | None = None
        self.last_status = time.monotonic()
        self.started = time.monotonic()
        # Trials that ended (completed, stopped by a scheduler, errored), as Tune reported them.
        # Tune steps until every trial has ended (a time budget stops them all first) unless it
        # is interrupted (Ctrl-C, SIGUSR1); its clean-up then marks the trials it stops
        # TERMINATED without reporting their end, so they stay out of this set.
        self.ended: set[str] = set()
        self._trials: list = []  # Tune's own list of the search's trials, as of its last step

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_trials": []}  # pickled with the search: not its trials

    @property
    def unfinished(self) -> list[str]:
        """Trials running, pending or paused when Tune last stepped."""
        return [t.trial_id for t in self._trials if t.trial_id not in self.ended]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and improves(value, None if self.best is None else self.best[0], self.mode):
            self.best = (float(value), trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)
        result = trial.last_result or {}
        epochs = epochs_run(result)
        stopped = self.max_epochs is not None and epochs < self.max_epochs
        verb = "stopped early" if stopped else "done"
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, int | float) else "-"
        self.emit(f"trial {trial.trial_id} {verb} after {epochs} epochs: {self.metric} {shown}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)
        self.emit(f"trial {trial.trial_id} failed: see {trial.path}/error.txt")

    def on_step_end(self, iteration, trials, **info) -> None:
        # Tune steps many times a second: a pass over every trial here was a quarter of the
        # driver's CPU at 3,000 trials (py-spy). The trials a resumed search had ended are
        # counted once, at its first step.
        if not self._trials:
            self.ended.update(t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR"))
        self._trials = trials
        now = time.monotonic()
        if now - self.last_status >= self.interval_s:
            self.last_status = now
            self.emit(self.status(trials))
        if now - self.written_at >= WRITE_EVERY_S:
            self.write(trials, now)

    def on_experiment_end(self, trials, **info) -> None:
        self.emit(self.status(trials))
        self.write(trials, time.monotonic())

    def write(self, trials, now: float) -> None:
        """progress.json, for `stoker jobs status` (atomic: a reader never sees half of it).
        Counted from Tune's trials, so a resumed search counts the trials it had finished."""
        self.written_at = now
        if self.experiment is None:
            return
        counts = {"running": 0, "done": 0, "stopped": 0, "errored": 0}
        for trial in trials:
            if trial.status == "ERROR":
                counts["errored"] += 1
            elif trial.status != "TERMINATED":
                counts["running"] += 1
            elif self.max_epochs is not None and epochs_run(trial.last_result or {}) < self.max_epochs:
                counts["stopped"] += 1
            else:
                counts["done"] += 1
        write_json(self.experiment / PROGRESS_FILE, SearchProgress(
            **counts, best=self.best[0] if self.best else None,
            best_trial=self.best[1] if self.best else None, metric=self.metric,
            elapsed_s=round(now - self.started, 1)), indent=None)

    def status(self, trials) -> str:
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        parts = [f"{counts.get(s, 0)} {s.lower()}" for s in ("RUNNING", "PENDING", "PAUSED", "TERMINATED", "ERROR") if counts.get(s)]
        best = f"; best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else ""
        return f"[{time.monotonic() - self.started:6.0f}s] {', '.join(parts) or 'no trials'}{best}"
