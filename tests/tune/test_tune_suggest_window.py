"""The TPE searcher's bounded history (stoker.tune.bounded_tpe): past `tune.history_window`
finished trials, what the sampler reads at each suggestion stops growing, and it still holds the
best trials (TPE's good split) and the latest ones. Structural, not timed: an unbounded history
fails these by its counts. Fast: no Ray cluster."""

import pickle

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from pydantic import ValidationError
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from stoker.tune.algorithms import build_searcher
from stoker.tune.bounded_tpe import BoundedHistoryStorage, best_share
from stoker.tune.space import param_space
from tests.tune.synthetic import tune_config

WINDOW = 100
X = optuna.distributions.FloatDistribution(0.0, 1.0)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SeeingTPE(optuna.samplers.TPESampler):
    """TPE that notes how many finished trials the study shows it at each model-based pick
    (`sample_relative`, the public hook where it reads the history)."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.seen: list[int] = []

    def sample_relative(self, study, trial, search_space):
        self.seen.append(len(study.get_trials(deepcopy=False, states=FINISHED)))
        return super().sample_relative(study, trial, search_space)


def finished_study(n: int, window: int = WINDOW, directions=("maximize",), seed: int = 0):
    """A study in a bounded storage that already holds `n` finished trials of known values."""
    rng = np.random.default_rng(seed)
    sampler = SeeingTPE(seed=seed, n_startup_trials=5)
    study = optuna.create_study(storage=BoundedHistoryStorage(window), sampler=sampler, directions=list(directions))
    xs = rng.uniform(size=n)
    values = [[x, *rng.uniform(size=len(directions) - 1)] for x in xs]
    study.add_trials([optuna.trial.create_trial(params={"x": x, "y": x}, distributions={"x": X, "y": X}, values=v)
                      for x, v in zip(xs, values, strict=True)])
    return study, sampler, np.array(values)


def test_the_sampler_sees_at_most_the_window_however_many_trials_finished():
    study, sampler, _ = finished_study(4 * WINDOW)
    for _ in range(3):
        trial = study.ask({"x": X, "y": X})
        study.tell(trial, trial.params["x"])
    # Unbounded, it would see 400, 401, 402 finished trials; bounded, the best tenth and the
    # latest rest (fewer where a best trial is also a latest one).
    assert len(sampler.seen) == 3 and all(WINDOW - best_share(WINDOW) < seen <= WINDOW for seen in sampler.seen)
    assert len(study.trials) <= WINDOW  # what the study lists is the window too...
    assert study._storage.get_n_trials(study._study_id) == 4 * WINDOW + 3  # ...its count is every trial
    assert study.best_value == max(t.value for t in study.trials)


def test_the_window_keeps_the_best_trials_and_the_latest_in_number_order():
    study, _, values = finished_study(5 * WINDOW)
    listed = study.get_trials(deepcopy=False)
    numbers = [t.number for t in listed]
    assert numbers == sorted(numbers)
    best = set(np.argsort(-values[:, 0])[:best_share(WINDOW)].tolist())
    latest = set(range(5 * WINDOW - (WINDOW - best_share(WINDOW)), 5 * WINDOW))
    assert set(numbers) == best | latest
    # TPE's good split (the best 25 of one objective) is the one unbounded TPE would make.
    assert best_share(WINDOW) >= 25
    assert study.best_trial.number in numbers


def test_with_several_objectives_the_window_keeps_the_pareto_front():
    study, _, values = finished_study(4 * WINDOW, directions=("maximize", "minimize"))
    turned = values * [-1.0, 1.0]
    front = {i for i in range(len(turned))
             if not any((turned[j] <= turned[i]).all() and (turned[j] < turned[i]).any() for j in range(len(turned)))}
    assert len(front) <= best_share(WINDOW)
    listed = {t.number for t in study.get_trials(deepcopy=False)}
    assert front <= listed and len(listed) <= WINDOW


def test_running_and_enqueued_trials_are_listed_and_a_snapshot_keeps_the_window():
    study, _, _ = finished_study(3 * WINDOW)
    study.enqueue_trial({"x": 0.5, "y": 0.5})
    first = study.ask({"x": X, "y": X})
    assert first.params == {"x": 0.5, "y": 0.5}  # the queue still works through the window
    running = study.ask({"x": X, "y": X})
    assert {first.number, running.number} <= {t.number for t in study.trials if t.state == TrialState.RUNNING}
    storage = pickle.loads(pickle.dumps(study._storage))  # Tune snapshots the searcher by pickling it
    again = optuna.load_study(study_name=study.study_name, storage=storage)
    again.tell(running.number, 2.0)
    assert len(again.get_trials(states=FINISHED)) <= WINDOW
    assert again.best_trial.number == running.number


def searched(options: dict, tune_cfg) -> tuple:
    """build_searcher's TPE searcher as Tune sets it up, one trial suggested."""
    searcher = build_searcher(tune_cfg, [], 2, options)
    assert ConcurrencyLimiter(searcher, max_concurrent=2).set_search_properties(
        "val_accuracy", "max", param_space(tune_cfg))
    searcher.suggest("first")
    return searcher, searcher._ot_trials["first"].params  # the one look inside Ray's wrapper


def test_tpe_searches_read_a_bounded_history_warm_started_or_not():
    window = 250  # the smallest tune.history_window: TPE's good split is then the unbounded one
    tune_cfg = tune_config(history_window=window, seed=1)
    plain, params = searched({}, tune_cfg)
    # A warm start's study (stoker.tune.warm_start makes a plain in-memory one): a window full.
    warm = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="warm", direction="maximize")
    distributions = plain._ot_study.trials[0].distributions
    warm.add_trials([optuna.trial.create_trial(params=params, distributions=distributions, value=i / 1000)
                     for i in range(window)])
    warmed, _ = searched({"storage": warm._storage, "study_name": "warm"}, tune_cfg)
    for searcher in (plain, warmed):
        for i in range(window + 50):
            searcher.add_evaluated_point(params, 0.9 - i / 10000)  # the best ones are the oldest
        searcher.on_trial_complete("first", {"val_accuracy": 0.1})
        assert searcher.suggest("second")
        study = searcher._ot_study
        assert len(study.get_trials(deepcopy=False, states=FINISHED)) == window
        assert study._storage.get_n_trials(study._study_id, FINISHED) > window + 50


def test_a_window_too_small_for_the_good_split_is_refused():
    with pytest.raises(ValueError, match="more than the 25 best"):
        BoundedHistoryStorage(20)
    with pytest.raises(ValidationError, match="history_window"):
        tune_config(history_window=100)


def test_below_the_window_suggestions_are_exactly_unbounded_tpes():
    # Until the window fills, the sampler reads the very trials, in the same order, that a plain
    # in-memory study gives it: same seed, same suggestions (search quality unchanged).
    tune_cfg = tune_config(seed=3)
    suggestions = []
    for storage in ({}, {"storage": optuna.storages.InMemoryStorage(), "study_name": "plain"}):
        searcher = build_searcher(tune_cfg, [], 2)
        if storage:  # what build_searcher made before the window: Ray's OptunaSearch on its own
            searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tune_cfg.seed), **storage)
        ConcurrencyLimiter(searcher, max_concurrent=2).set_search_properties(
            "val_accuracy", "max", param_space(tune_cfg))
        drawn = []
        for i in range(25):
            drawn.append(searcher.suggest(f"t{i}"))
            lr = drawn[-1]["train"]["optimizer"]["lr"]
            searcher.on_trial_complete(f"t{i}", {"val_accuracy": -abs(np.log10(lr) + 2.5)})
        suggestions.append(drawn)
    assert suggestions[0] == suggestions[1]
