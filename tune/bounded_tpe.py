"""A bounded history for the TPE searcher, so that a suggestion costs the same at trial 10,000
as at trial 1,000.

Optuna's TPESampler reads the study's whole history on every suggestion (it sorts every
finished trial, converts each one's parameters and fits its Parzen estimators on all of them),
so each suggestion costs time in proportion to the trials so far: about 40 ms at 3,000 trials
on an idle 2-CPU machine and over 200 ms under load, which holds up Tune's whole event loop
(ray issue 18903, optuna issue 2172). None of TPESampler's options bounds that: `n_startup_trials`
only delays the model, `multivariate=False` fits one model per parameter on the same history,
`constant_liar` adds the running trials to it.

The sampler reads the history through its storage's `get_all_trials`, so `BoundedHistoryStorage`
(an `InMemoryStorage`, the storage Ray's `OptunaSearch` uses when given none) answers it with
a window: every unfinished trial, the best finished ones and the most recent rest, at most
`window` finished trials in all. TPE's quality comes from its good/bad split: its good model
is fitted on the best `min(ceil(n / 10), 25)` of the n trials it sees (one objective), which is
25 once it sees 250; the best part of the window keeps at least 25, so with a window of 250 or
more that model is the one unbounded TPE would fit. Only the bad model sees the recent trials
instead of every trial, and the recent trials are the ones TPE's default weights favour
anyway. With several objectives, the good split is a tenth of what the sampler sees by Pareto
rank; the window keeps the current Pareto front.

Only Optuna's public storage API is used (`InMemoryStorage` and the `BaseStorage` methods it
overrides), no private name, so no version check: a later Optuna whose sampler stopped reading
through `get_all_trials` would fail tests/tune/test_tune_suggest_window.py, which counts what
the sampler sees. `study.trials` of such a study lists the window, not every trial (Tune's
results hold every trial); `study.best_trial` and the trial count still see them all.
"""

import copy
import heapq
from collections import deque
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

MIN_BEST = 25
"""The best trials a window always keeps: TPE's good split of one objective is at most 25
trials (`optuna.samplers._tpe.sampler.default_gamma`)."""


def best_share(window: int) -> int:
    """How many of a window's finished trials are the best ones: a tenth, at least MIN_BEST."""
    return max(MIN_BEST, window // 10)


@dataclass
class _Window:
    """One study's window, kept up to date as trials start and finish. A finished trial's
    FrozenTrial no longer changes (Optuna refuses updates to finished trials), so the window
    keeps the objects themselves; unfinished ones are read afresh at each listing."""

    directions: list[StudyDirection]
    best_size: int
    latest: deque[FrozenTrial]
    """The most recently finished trials, oldest first."""
    open: dict[int, int] = field(default_factory=dict)
    """trial id -> number of waiting and running trials (as many as run at once)."""
    best: list[tuple[tuple[float, ...], int, FrozenTrial]] = field(default_factory=list)
    """(values, number, trial), values turned so that smaller is better. One objective: a heap
    of the best `best_size` (worst first, as a heap of negated values); several: the Pareto
    front, capped at `best_size` (the oldest members leave first)."""
    _listing: list[FrozenTrial] | None = None
    """The finished trials of the window in number order, until the next one finishes."""

    def finish(self, trial_id: int, trial: FrozenTrial) -> None:
        self.open.pop(trial_id, None)
        self.latest.append(trial)
        self._listing = None
        if trial.state != TrialState.COMPLETE or trial.values is None:
            return  # TPE ranks pruned trials after every complete one; failed ones not at all
        turned = tuple(v if d == StudyDirection.MINIMIZE else -v
                       for v, d in zip(trial.values, self.directions, strict=True))
        if len(turned) == 1:
            heapq.heappush(self.best, ((-turned[0],), trial.number, trial))
            if len(self.best) > self.best_size:
                heapq.heappop(self.best)
        else:
            self._front(turned, trial)

    def _front(self, turned: tuple[float, ...], trial: FrozenTrial) -> None:
        if any(_dominates(member, turned) for member, _, _ in self.best):
            return
        self.best = [entry for entry in self.best if not _dominates(turned, entry[0])]
        self.best.append((turned, trial.number, trial))
        if len(self.best) > self.best_size:
            self.best.remove(min(self.best, key=lambda entry: entry[1]))

    def finished(self) -> list[FrozenTrial]:
        """The window's finished trials in number order (the order Optuna's search-space cache
        and TPE's weights assume)."""
        if self._listing is None:
            by_number = {trial.number: trial for trial in self.latest}
            by_number.update((number, trial) for _, number, trial in self.best)
            self._listing = [by_number[number] for number in sorted(by_number)]
        return self._listing


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


class BoundedHistoryStorage(optuna.storages.InMemoryStorage):
    """An in-memory Optuna storage whose trial listings hold at most `window` finished trials:
    the best `best_share(window)` and the most recent rest, plus every unfinished trial."""

    def __init__(self, window: int) -> None:
        if window <= MIN_BEST:
            raise ValueError(f"a history window must hold more than the {MIN_BEST} best trials, got {window}")
        super().__init__()
        self.window = window
        self._windows: dict[int, _Window] = {}
        self._study_of: dict[int, int] = {}  # trial id -> study id, for unfinished trials

    def _window(self, study_id: int) -> _Window:
        if study_id not in self._windows:
            best = best_share(self.window)
            self._windows[study_id] = _Window(self.get_study_directions(study_id), best,
                                              deque(maxlen=self.window - best))
        return self._windows[study_id]

    # The window's bookkeeping runs after InMemoryStorage's own, outside its lock (a private
    # name): Tune asks and tells its searcher from one thread, the event loop's.

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        trial = self.get_trial(trial_id)
        if trial.state.is_finished():  # added whole: a warm start's trials, an evaluated point
            self._window(study_id).finish(trial_id, trial)
        else:
            self._window(study_id).open[trial_id] = trial.number
            self._study_of[trial_id] = study_id
        return trial_id

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state.is_finished():
            self._window(self._study_of.pop(trial_id)).finish(trial_id, self.get_trial(trial_id))
        return changed

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if states == (TrialState.WAITING,):
            # Study.ask's queue of enqueued points: InMemoryStorage keeps its own cursor for it.
            return super().get_all_trials(study_id, deepcopy, states)
        window = self._window(study_id)
        trials = list(window.finished())  # a copy: the caller may change its list
        if window.open:
            # Two runs in number order: Python's sort merges them in one pass.
            trials = sorted([*trials, *map(self.get_trial, window.open)], key=lambda trial: trial.number)
        if states is not None:
            trials = [trial for trial in trials if trial.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        # Every trial counts (Optuna's MaxTrialsCallback), not only the window's.
        states = (state,) if isinstance(state, TrialState) else state
        return len(super().get_all_trials(study_id, deepcopy=False, states=states))


def bounded_storage(window: int, given: optuna.storages.BaseStorage | None = None,
                    study_name: str | None = None) -> BoundedHistoryStorage:
    """A BoundedHistoryStorage; with `given` (a warm start's in-memory study named
    `study_name`), one that holds a copy of that study and its trials."""
    storage = BoundedHistoryStorage(window)
    if given is None:
        return storage
    earlier = optuna.load_study(study_name=study_name, storage=given)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=earlier.directions)
    study.add_trials(earlier.get_trials(deepcopy=False))
    return storage
