"""Ray's HyperBand schedulers and BOHB searcher, with what resuming an experiment needs.

Tune saves its searcher with the experiment state, not its scheduler: a restored experiment
unpickles the scheduler as it was before the first trial, and HyperBand would put every trial it
is given back into new brackets, whose rungs and companions are not the trial's own. `Brackets`,
a Tune callback (whose state Tune saves with each experiment snapshot, and gives back before it
re-adds the trials), saves the scheduler's brackets, each trial named by its id; the scheduler
puts each re-added trial back in its own bracket, so early stopping carries on where it was.

HyperBand pauses each trial at its rung, then stops the ones its bracket drops while they are
paused. Ray 2.60 records a stopped trial's TERMINATED status in the experiment state only when
the trial still has an actor (`TuneController._schedule_trial_stop` returns before marking a
paused one), so the saved state keeps such trials PAUSED and `--resume` trains them again. The
schedulers here mark them; the state is serialised at the next save, after the stop.

ASHA (Ray's `AsyncHyperBandScheduler`) loses its rungs the same way: restored, it would compare
the trials left with empty rungs and carry every one of them past the milestones where the
uninterrupted search stops them. `AsyncRungs` saves them with each snapshot through the
scheduler's own `save`/`restore` (its rungs hold trial ids, never trials).

TuneBOHB forgets a trial's parameters when the trial completes (or errors) and raises KeyError
on a later result of it, which is what a trial resumed by `--resume` (an errored one, say)
sends. The searcher here takes such a trial's parameters from its result instead.
"""

import io
import pickle
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback, Checkpoint, schedulers
from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import TrialScheduler
from ray.tune.search.bohb import TuneBOHB

from stoker.ray_internals import mark_trial_to_checkpoint, private_field
from stoker.tune.results import epochs_run

_MISSING = object()


class _Resumable:
    def bracket_state(self) -> bytes:
        """The brackets (their rungs, trials and last results) and HyperBand's position among
        them, with each trial pickled as its id."""
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer)
        pickler.persistent_id = lambda obj: obj.trial_id if isinstance(obj, Trial) else None
        pickler.dump({name: private_field(self, name) for name in _BRACKET_FIELDS})
        return buffer.getvalue()

    def restore_brackets(self, state: bytes) -> None:
        """Take back `bracket_state`'s brackets; each trial stays a stand-in, its id, until Tune
        re-adds the trial (`on_trial_add`)."""
        stand_ins: dict[str, _StandIn] = {}
        unpickler = pickle.Unpickler(io.BytesIO(state))
        unpickler.persistent_load = lambda trial_id: stand_ins.setdefault(trial_id, _StandIn(trial_id))
        self.__dict__.update(unpickler.load())
        self.__dict__["_stand_ins"] = stand_ins

    def on_trial_add(self, tune_controller, trial) -> None:
        stand_in = self.__dict__.get("_stand_ins", {}).pop(trial.trial_id, None)
        if stand_in is not None:
            self._take_back(trial, stand_in)
            return
        if trial.status == Trial.TERMINATED and "_stand_ins" in self.__dict__:
            return  # finished before the restore, and not one of the brackets' (nothing to do)
        super().on_trial_add(tune_controller, trial)
        if "_stand_ins" not in self.__dict__ and (trial.last_result or {}).get(private_field(self, "_time_attr")):
            # Restored from an experiment saved without its brackets (by an older stoker).
            self.__dict__.setdefault("_carried_over", set()).add(trial.trial_id)

    def _take_back(self, trial, stand_in: "_StandIn") -> None:
        """Put `trial` where its stand-in is in the restored brackets."""
        trial_info = private_field(self, "_trial_info")
        bracket, band = trial_info.pop(stand_in)
        trial_info[trial] = bracket, band
        live = private_field(bracket, "_live_trials")
        was_live = stand_in in live
        # Same order: HyperBand picks the next trial to run in it.
        replaced = {(trial if key is stand_in else key): result for key, result in live.items()}
        live.clear()
        live.update(replaced)
        trials = private_field(bracket, "_all_trials")
        trials[:] = [trial if t is stand_in else t for t in trials]
        if stand_in in bracket.trials_to_unpause:
            bracket.trials_to_unpause.discard(stand_in)
            bracket.trials_to_unpause.add(trial)
        if trial.status == Trial.TERMINATED:
            return
        if not was_live:
            # Errored before the restore, it runs again (`--resume` retries errored trials).
            live[trial] = trial.last_result if trial.last_result.get(private_field(self, "_time_attr")) else None
        elif not bracket.continue_trial(trial) and trial not in bracket.trials_to_unpause and not bracket.finished():
            # It had reached its rung and waits for its companions: paused, as it was. Pending,
            # it would train past the rung before HyperBand could compare it with them.
            trial.set_status(Trial.PAUSED)

    def choose_trial_to_run(self, tune_controller, *args, **kwargs):
        if self.__dict__.get("_stand_ins"):
            self._drop_stand_ins()
        return super().choose_trial_to_run(tune_controller, *args, **kwargs)

    def _drop_stand_ins(self) -> None:
        """Forget the restored brackets' trials that Tune did not re-add (none, as long as the
        experiment state and the brackets come from the same snapshot, which Tune writes at once)."""
        gone = set(self.__dict__["_stand_ins"].values())
        self.__dict__["_stand_ins"] = {}
        trial_info = private_field(self, "_trial_info")
        for stand_in in gone:
            trial_info.pop(stand_in, None)
        for band in private_field(self, "_hyperbands"):
            for bracket in filter(None, band):
                for stand_in in gone:
                    private_field(bracket, "_live_trials").pop(stand_in, None)
                    bracket.trials_to_unpause.discard(stand_in)
                trials = private_field(bracket, "_all_trials")
                trials[:] = [t for t in trials if t not in gone]

    def on_trial_remove(self, tune_controller, trial) -> None:
        # Tune calls this for a PENDING or PAUSED trial it is about to stop.
        super().on_trial_remove(tune_controller, trial)
        mark_trial_to_checkpoint(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        # A trial that has trained its whole budget is done, whatever its bracket says (it would
        # otherwise be paused for a rung above max_t that never comes, and the search would wait
        # for it forever). The epochs its Train run reports count too: restored from a snapshot
        # older than its last epochs, a trial's iteration count lags the epochs it has trained.
        trained = max(result.get(private_field(self, "_time_attr"), 0), epochs_run(result))
        if action == TrialScheduler.PAUSE and trained >= private_field(self, "_max_t_attr"):
            return TrialScheduler.STOP
        # Restored without its brackets (an experiment saved by an older stoker), a carried-over
        # trial sits in a new bracket whose rungs and companions are not its own: paused there
        # it can wait for ever, so it trains on to its budget instead.
        if action == TrialScheduler.PAUSE and trial.trial_id in self.__dict__.get("_carried_over", ()):
            return TrialScheduler.CONTINUE
        return action


_BRACKET_FIELDS = ("_hyperbands", "_trial_info", "_state", "_num_stopped")
"""What HyperBand (and its BOHB variant) keeps of its brackets: the bands of brackets, each
trial's bracket and band, the bracket being filled, the count of trials stopped."""


class _StandIn:
    """A trial of restored brackets that Tune has not re-added yet."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id
        self.status = Trial.TERMINATED  # until re-added: never chosen to run, never waited for


class Brackets(Callback):
    """Saves a HyperBand scheduler's brackets with every experiment snapshot (Tune saves a
    callback's state there, and restores it before it re-adds the trials)."""

    def __init__(self, scheduler: _Resumable) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        return {"brackets": self.scheduler.bracket_state()}

    def set_state(self, state: dict) -> None:
        self.scheduler.restore_brackets(state["brackets"])


class AsyncRungs(Callback):
    """Saves an ASHA scheduler's rungs (each trial's result at each milestone, by trial id) with
    every experiment snapshot, through Ray's own `save`/`restore` of the scheduler."""

    def __init__(self, scheduler: schedulers.AsyncHyperBandScheduler) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory, "asha.pkl")
            self.scheduler.save(str(path))
            return {"asha": path.read_bytes()}

    def set_state(self, state: dict) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory, "asha.pkl")
            path.write_bytes(state["asha"])
            self.scheduler.restore(str(path))


def keeps_brackets(scheduler: Any) -> list[Callback]:
    """The callbacks a search with `scheduler` needs for its brackets (HyperBand) or rungs
    (ASHA) to survive a restore."""
    if isinstance(scheduler, _Resumable):
        return [Brackets(scheduler)]
    return [AsyncRungs(scheduler)] if isinstance(scheduler, schedulers.AsyncHyperBandScheduler) else []


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
