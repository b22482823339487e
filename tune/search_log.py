"""A search's trial log (`search_log.jsonl` in its experiment directory) and the Optuna study
rebuilt from it, which `stoker dashboard` serves live.

The driver appends one JSON line per trial event (started with its parameters, a result, ended
and how). Why a log and not an Optuna storage written by the driver: Optuna's storages keep
every trial and reported value in memory (the journal storage replays its whole log), and a
search of 10,000 trials keeps a bounded summary per trial in the driver; an appended line costs
a write and no memory. The dashboard, a process of its own, replays the log into an in-memory
Optuna study (`LiveStudy`), reading only what was appended since it last looked.

A line cut short by a crash is skipped, and the trial it names is marked `damaged` in the view;
the search itself resumes from Tune's own state, not from this log.
"""

import datetime
import json
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from pydantic import TypeAdapter
from ray.tune import Callback

from stoker.tune.config import Distribution
from stoker.tune.importance import distribution
from stoker.tune.results import _cell, epochs_run, history_curve
from stoker.tune.space import sampled_values

LOG_FILE = "search_log.jsonl"


class SearchLog(Callback):
    """Appends the search's trial events to `<experiment>/search_log.jsonl`. Holds no file
    handle: Tune pickles its callbacks with the experiment (a resumed search gets them back)."""

    def __init__(self, experiment: Path, tune_cfg, metric: str, mode: str, max_epochs: int) -> None:
        self.path = experiment / LOG_FILE
        self.tune_cfg, self.metric, self.mode, self.max_epochs = tune_cfg, metric, mode, max_epochs
        # The search's running time over all its drivers, as Tune's time budget counts it (its
        # stopper's budget survives a resume too): a trial stopped once it is spent was
        # stopped by the budget, not by the scheduler.
        self.ran_s, self._since = 0.0, time.monotonic()

    def _running_s(self) -> float:
        return self.ran_s + time.monotonic() - self._since

    def get_state(self) -> dict[str, Any]:
        return {"ran_s": self._running_s()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.ran_s, self._since = float(state.get("ran_s", 0.0)), time.monotonic()

    def _append(self, event: dict[str, Any]) -> None:
        # One write of one whole line: a reader sees a line complete or not at all, unless the
        # process dies inside the write (the reader's damaged line).
        with self.path.open("a") as log:
            log.write(json.dumps({**event, "t": round(time.time(), 3)}, default=str) + "\n")

    def setup(self, **info) -> None:
        self._since = time.monotonic()
        self._append({"event": "search", "name": self.path.parent.name, "metric": self.metric, "mode": self.mode,
                      "epochs": self.max_epochs, "scheduler": self.tune_cfg.scheduler.name,
                      "space": {p: d.model_dump(mode="json") for p, d in self.tune_cfg.space.items()}})

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        params = {path: _cell(value) for path, value in sampled_values(trial.config, self.tune_cfg).items()}
        self._append({"event": "start", "trial": trial.trial_id, "params": params})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float):
            self._append({"event": "result", "trial": trial.trial_id, "epoch": epochs_run(result), "value": value})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        epochs = epochs_run(result)
        stopped = epochs < self.max_epochs
        self._append({"event": "end", "trial": trial.trial_id, "status": "stopped" if stopped else "done",
                      "stopped_by": self._stopped_by() if stopped else None,
                      "value": result.get(self.metric), "epochs": epochs, **_where(result)})

    def _stopped_by(self) -> str:
        budget = self.tune_cfg.time_budget_s
        return "time_budget" if budget is not None and self._running_s() >= budget else self.tune_cfg.scheduler.name

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        self._append({"event": "end", "trial": trial.trial_id, "status": "error", "stopped_by": None,
                      "value": None, "epochs": epochs_run(result), **_where(result)})


def _where(result: dict[str, Any]) -> dict[str, Any]:
    # The process and node that ran the trial (as Tune's results name them), for error analysis
    # and for telling reused trial processes apart.
    return {"pid": result.get("pid"), "node": result.get("node_ip")}


_SPACE = TypeAdapter(Distribution)
_TRIAL_IN = re.compile(rb'"trial": "([^"]+)"')


@dataclass
class _Started:
    """A trial seen in this read whose Optuna trial is not created yet (see `LiveStudy.refresh`)."""

    params: dict[str, Any]
    start: float
    intermediate: dict[int, float] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    damaged: bool = False


@dataclass
class LiveStudy:
    """One experiment's log replayed into an Optuna study of `storage`, read on from where the
    last `refresh` stopped. Trials are Optuna trials with the Tune trial id, the status and who
    stopped them as user attributes; a trial stopped early is PRUNED, an errored one FAIL."""

    storage: BaseStorage
    log: Path
    offset: int = 0
    study_id: int | None = None
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    trial_ids: dict[str, int] = field(default_factory=dict)
    """Tune trial id -> Optuna trial id."""
    damaged: int = 0
    """Lines that did not parse (cut short by a crash)."""

    def refresh(self) -> int:
        """Read what was appended since the last call; the number of events applied."""
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += complete
        started: dict[str, _Started] = {}
        applied = 0
        for line in data[:complete].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                self._damage(line, started)
                continue
            self._apply(event, started)
            applied += 1
        # Trials started and (maybe) ended within this read are created whole, with their own
        # times: a replayed finished search keeps its history, not the moment it was read.
        for tune_id, trial in started.items():
            self.trial_ids[tune_id] = self.storage.create_new_trial(self.study_id, self._frozen(tune_id, trial))
        return applied

    def _damage(self, line: bytes, started: dict[str, _Started]) -> None:
        self.damaged += 1
        if (match := _TRIAL_IN.search(line)) is None:
            return
        tune_id = match.group(1).decode(errors="replace")
        if tune_id in started:
            started[tune_id].damaged = True
        elif tune_id in self.trial_ids:
            self.storage.set_trial_user_attr(self.trial_ids[tune_id], "damaged", True)

    def _apply(self, event: dict[str, Any], started: dict[str, _Started]) -> None:
        kind, tune_id = event.get("event"), event.get("trial")
        if kind == "search":
            self._open(event)
        elif self.study_id is None:
            return  # no header yet: a log from before the search started writing it
        elif kind == "start" and tune_id not in self.trial_ids and tune_id not in started:
            started[tune_id] = _Started(event["params"], event["t"])
        elif kind == "result" and tune_id in started:
            started[tune_id].intermediate[int(event["epoch"])] = float(event["value"])
        elif kind == "result" and tune_id in self.trial_ids and self._running(tune_id):
            self.storage.set_trial_intermediate_value(self.trial_ids[tune_id], int(event["epoch"]), float(event["value"]))
        elif kind == "end" and tune_id in started:
            started[tune_id].end = event
        elif kind == "end" and tune_id in self.trial_ids and self._running(tune_id):
            trial_id = self.trial_ids[tune_id]
            for key, value in self._end_attrs(event).items():
                self.storage.set_trial_user_attr(trial_id, key, value)
            state, value = self._final(event)
            self.storage.set_trial_state_values(trial_id, state, None if value is None else [value])

    def _open(self, header: dict[str, Any]) -> None:
        if self.study_id is not None:
            return  # a resumed search writes its header again
        self.distributions = {p: distribution(_SPACE.validate_python(d)) for p, d in header["space"].items()}
        direction = StudyDirection.MAXIMIZE if header["mode"] == "max" else StudyDirection.MINIMIZE
        self.study_id = self.storage.create_new_study([direction], study_name=header["name"])
        # The objective's name, which optuna-dashboard shows on its axes (Optuna calls the
        # method experimental; it has kept its interface since 3.2).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            Study(header["name"], self.storage).set_metric_names([header["metric"]])
        self.storage.set_study_user_attr(self.study_id, "metric", header["metric"])
        self.storage.set_study_user_attr(self.study_id, "scheduler", header["scheduler"])

    def _running(self, tune_id: str) -> bool:
        return self.storage.get_trial(self.trial_ids[tune_id]).state == TrialState.RUNNING

    @staticmethod
    def _end_attrs(event: dict[str, Any]) -> dict[str, Any]:
        return {"status": event["status"], "stopped_by": event.get("stopped_by"), "epochs": event.get("epochs")}

    @staticmethod
    def _final(event: dict[str, Any]) -> tuple[TrialState, float | None]:
        value = event.get("value")
        if event["status"] == "error" or not isinstance(value, int | float):
            return TrialState.FAIL, None
        # A trial the scheduler stopped early is Optuna's PRUNED; its curve stays.
        return (TrialState.PRUNED, None) if event["status"] == "stopped" else (TrialState.COMPLETE, float(value))

    def _frozen(self, tune_id: str, trial: _Started) -> FrozenTrial:
        params = {p: v for p, v in trial.params.items() if p in self.distributions and _fits(self.distributions[p], v)}
        state, value = (TrialState.RUNNING, None) if trial.end is None else self._final(trial.end)
        attrs: dict[str, Any] = {"tune_trial": tune_id, "status": "running"}
        if trial.end is not None:
            attrs |= self._end_attrs(trial.end)
        if trial.damaged:
            attrs["damaged"] = True
        when = datetime.datetime.fromtimestamp
        return FrozenTrial(
            number=0, trial_id=0, state=state, value=value, params=params,  # number and id: given by the storage
            distributions={p: self.distributions[p] for p in params}, user_attrs=attrs, system_attrs={},
            intermediate_values=trial.intermediate, datetime_start=when(trial.start),
            datetime_complete=when(trial.end["t"]) if trial.end is not None else None)


def events(experiment: Path, kind: str | None = None) -> Iterator[dict[str, Any]]:
    """The log's events in order (only those of `kind`, given one); damaged lines skipped."""
    path = experiment / LOG_FILE
    if not path.exists():
        return
    wanted = None if kind is None else f'"event": "{kind}"'.encode()
    with path.open("rb") as handle:
        for line in handle:
            if wanted is not None and wanted not in line:
                continue  # most lines are results: not parsed when not asked for
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if kind is None or event.get("event") == kind:
                yield event


def histories(experiment: Path) -> dict[str, list[tuple[int, float]]]:
    """Each trial's metric by epoch (Tune's training_iteration), from one read of the log: what the
    results table and the report's learning curves need, without a file per trial. A re-reported
    epoch (a resumed trial) keeps its last value."""
    curves: dict[str, dict[int, float]] = {}
    for event in events(experiment, "result"):
        curves.setdefault(event["trial"], {})[int(event["epoch"])] = float(event["value"])
    return {trial: sorted(by_epoch.items()) for trial, by_epoch in curves.items()}


def curves_of(results, experiment: Path, metric: str) -> dict[str, list[tuple[int, float]]]:
    """Each trial's metric by epoch: from the search log, and for a trial it lacks (an experiment
    started before stoker wrote the log) from Tune's own results files."""
    curves = histories(experiment)
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        if trial_id not in curves and (curve := history_curve(result, metric)):
            curves[trial_id] = curve
    return curves


def _fits(dist: BaseDistribution, value: Any) -> bool:
    return value in dist.choices if isinstance(dist, CategoricalDistribution) else isinstance(value, int | float)
