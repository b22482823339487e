"""The scheduler wrapper of searches that reuse actors: PENDING trials are left to Tune's
controller (which hands a finished trial's actor to a trial with none), PAUSED ones are still
chosen, schedulers with their own choice are left alone, and it survives tuner.pkl."""

import pickle

import ray.cloudpickle
from ray.tune.experiment import Trial
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
)

from stoker.tune.runner import StartingTrialsKeepTheirActors


class Trials:
    """What a scheduler is given to choose from: the controller's `get_trials()`."""

    def __init__(self, *statuses: str) -> None:
        self.trials = []
        for status in statuses:
            trial = Trial("__fake", stub=True)
            trial.set_status(status)
            self.trials.append(trial)

    def get_trials(self):
        return self.trials


def test_fifo_order_schedulers_are_wrapped_and_leave_pending_trials_to_the_controller():
    for scheduler in (None, FIFOScheduler(), ASHAScheduler(max_t=3), MedianStoppingRule()):
        wrapped = StartingTrialsKeepTheirActors.wrap(scheduler)
        assert isinstance(wrapped, StartingTrialsKeepTheirActors)
        trials = Trials(Trial.TERMINATED, Trial.PENDING, Trial.RUNNING, Trial.PENDING)
        # The unwrapped scheduler picks the oldest PENDING trial, starting actor or not.
        assert wrapped.scheduler.choose_trial_to_run(trials) is trials.trials[1]
        assert wrapped.choose_trial_to_run(trials) is None


def test_a_paused_trial_is_still_chosen_by_a_scheduler_that_pauses():
    wrapped = StartingTrialsKeepTheirActors.wrap(MedianStoppingRule(hard_stop=False))
    trials = Trials(Trial.PENDING, Trial.PAUSED, Trial.RUNNING)
    assert wrapped.choose_trial_to_run(trials) is trials.trials[1]


def test_schedulers_with_their_own_choice_are_not_wrapped():
    for scheduler in (HyperBandScheduler(max_t=9), PopulationBasedTraining(hyperparam_mutations={"x": [1, 2]})):
        assert StartingTrialsKeepTheirActors.wrap(scheduler) is scheduler


def test_everything_else_is_the_wrapped_schedulers_and_it_pickles():
    asha = ASHAScheduler(max_t=9, grace_period=1, reduction_factor=3)
    wrapped = StartingTrialsKeepTheirActors.wrap(asha)
    assert wrapped.set_search_properties("val_loss", "min") and asha.metric == "val_loss"
    assert wrapped.metric == "val_loss" and wrapped.supports_buffered_results == asha.supports_buffered_results
    assert "Bracket" in wrapped.debug_string()
    # The Tuner pickles its TuneConfig (scheduler included) into tuner.pkl for --resume.
    for dumps in (pickle.dumps, ray.cloudpickle.dumps):
        again = pickle.loads(dumps(wrapped))
        assert isinstance(again, StartingTrialsKeepTheirActors) and again.metric == "val_loss"
        assert again.choose_trial_to_run(Trials(Trial.PENDING)) is None
