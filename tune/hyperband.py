"""Ray's HyperBand schedulers and BOHB searcher, with what resuming an experiment needs.

HyperBand pauses each trial at its rung, then stops the ones its bracket drops while they are
paused. Ray 2.60 records a stopped trial's TERMINATED status in the experiment state only when
the trial still has an actor (`TuneController._schedule_trial_stop` returns before marking a
paused one), so the saved state keeps such trials PAUSED and `--resume` trains them again. The
schedulers here mark them; the state is serialised at the next save, after the stop. Tune does
not save a scheduler's own state either (see `_Resumable.on_trial_result`).

TuneBOHB forgets a trial's parameters when the trial completes (or errors) and raises KeyError
on a later result of it, which is what a trial resumed by `--resume` (an errored one, say)
sends. The searcher here takes such a trial's parameters from its result instead.
"""

import uuid
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Checkpoint, schedulers
from ray.tune.schedulers.trial_scheduler import TrialScheduler
from ray.tune.search.bohb import TuneBOHB

from stoker.tune.ray_internals import mark_trial_to_checkpoint, private_field
from stoker.tune.results import epochs_run

_MISSING = object()


class _Resumable:
    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if (trial.last_result or {}).get(private_field(self, "_time_attr")):
            # Added with results already: carried over from before an experiment restore.
            # (Set here, not in __init__: a restored experiment unpickles its scheduler.)
            self.__dict__.setdefault("_carried_over", set()).add(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial) -> None:
        # Tune calls this for a PENDING or PAUSED trial it is about to stop.
        super().on_trial_remove(tune_controller, trial)
        mark_trial_to_checkpoint(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        # Tune saves no scheduler state: a resumed experiment puts its unfinished trials in new
        # brackets whose rungs do not match the epochs they have trained. One that reaches
        # max_t there would be paused for a rung above max_t that never comes, and the search
        # would wait for it forever. It has trained its whole budget: it is done. The epochs
        # its Train run reports count too: restored from a snapshot older than its last
        # epochs, a trial's iteration count lags the epochs it has trained.
        trained = max(result.get(private_field(self, "_time_attr"), 0), epochs_run(result))
        if action == TrialScheduler.PAUSE and trained >= private_field(self, "_max_t_attr"):
            return TrialScheduler.STOP
        # A trial carried over from before the restore sits in a new bracket whose rungs and
        # companions are not its own: paused there it can wait for ever. It trains on to its
        # budget instead (early stopping after a resume only approximates the schedule).
        if action == TrialScheduler.PAUSE and trial.trial_id in self.__dict__.get("_carried_over", ()):
            return TrialScheduler.CONTINUE
        return action


class HyperBandScheduler(_Resumable, schedulers.HyperBandScheduler):
    """Ray's synchronous HyperBand."""


class HyperBandForBOHB(_Resumable, schedulers.HyperBandForBOHB):
    """Ray's HyperBand variant for BOHB: brackets filled largest first, trials paused at their
    rung at once so the searcher can add trials with what that budget has taught it."""


class ResumableBOHB(TuneBOHB):
    """Ray's TuneBOHB that also learns from trials it has already closed."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self.trial_to_params:
            # `result` is flattened with "/", as the parameter names are.
            params = {name: result.get(f"config/{name}", _MISSING) for name in private_field(self, "_space")}
            if any(value is _MISSING for value in params.values()):
                self.running.add(trial_id)
                return  # not a config of this space (cannot be learnt from)
            self.trial_to_params[trial_id] = params
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.trial_to_params.setdefault(trial_id, {})
        super().on_trial_complete(trial_id, result, error)


class DonorKeepingPBT(schedulers.PopulationBasedTraining):
    """PBT whose exploit copies the donor's Tune checkpoint (a pointer) before handing it over.

    Tune keeps one pointer per trial (`launch`): the exploiting trial restores, later, from the
    donor's latest one, and a donor that reports again first deletes it ("does not exist on
    storage anymore"; a fast epoch wins that race). The copy, next to the donor's own
    checkpoints, is not Tune's to delete. The pointer leads to the donor's Train run, whose
    checkpoints `stoker.tune.checkpoints.seed_run` copies in turn.
    """

    def _exploit(self, tune_controller, trial, trial_to_clone) -> None:
        state = private_field(self, "_trial_state")[trial_to_clone]
        checkpoint = state.last_checkpoint
        if isinstance(checkpoint, Checkpoint) and checkpoint.path:
            # Not named `checkpoint_*`: `restore_deleted_pointers` reads those as Tune's own.
            parent, _, name = checkpoint.path.rstrip("/").rpartition("/")
            copy = f"{parent}/donated_{name}_to_{trial.trial_id}_{uuid.uuid4().hex[:6]}"
            checkpoint.filesystem.create_dir(copy)
            pafs.copy_files(checkpoint.path, copy, source_filesystem=checkpoint.filesystem,
                            destination_filesystem=checkpoint.filesystem)
            state.last_checkpoint = Checkpoint(copy, filesystem=checkpoint.filesystem)
        super()._exploit(tune_controller, trial, trial_to_clone)
