"""One definition of "better" for the whole run: best epoch, Ray's checkpoint ranking, early
stopping and the plateau schedule all ask `better`; a search's progress line and results table
and the monitor's metric drop ask its parts (`gain`, `improves`, `best_position`).

An epoch beats another when its validation metric (`train.metric`) is better; on an equal
metric, the lower validation loss wins (an accuracy that stays put while the loss keeps
falling is a model that keeps getting more confident and better calibrated); on equal both,
the earlier epoch stays. A metric that is NaN (ROC AUC on a one-class split) never wins.

Ray's checkpoint manager ranks checkpoints by one number and breaks ties its own way, so the
loop reports that number itself (`CHECKPOINT_RANK`): the best epoch so far always has the
strictly highest rank, so Ray keeps it first and can never evict it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from stoker.errors import UserError

T = TypeVar("T")

CHECKPOINT_RANK = "checkpoint_rank"
"""The reported metric Ray's CheckpointConfig ranks by (mode max)."""


@dataclass(frozen=True)
class Score:
    """One validation: the value of `train.metric` and the validation loss."""

    metric: float
    loss: float


def gain(candidate: float, incumbent: float, mode: str) -> float:
    """How much `candidate` improves on `incumbent` for a metric whose `mode` is "max" (else
    "min"): positive when it is better, negative when worse, NaN when either is NaN."""
    return candidate - incumbent if mode == "max" else incumbent - candidate


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether one metric value beats the best so far (None: anything does) by more than
    `min_delta`: an equal value does not, and NaN never does. (`better` adds the loss rule.)"""
    return best is None or gain(value, best, mode) > min_delta


def best_position(values: Sequence[float], mode: str) -> int | None:
    """The position of the best of `values` by `mode`: the first of equal ones, never a NaN;
    None when there is no number."""
    best: int | None = None
    for position, value in enumerate(values):
        if value == value and improves(value, None if best is None else values[best], mode):
            best = position
    return best


def direction(mode: str) -> str:
    """A metric's `mode` ("max" or "min") as an optimiser's direction word: Optuna's studies
    (a search's warm start, parameter importance) take "maximize" or "minimize"."""
    return "maximize" if mode == "max" else "minimize"


def better(candidate: Score, incumbent: Score | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `candidate` beats `incumbent` (None: anything beats it). `mode` is "max" or
    "min" for the metric; an improvement must exceed `min_delta`, and with `min_delta` 0 an
    equal metric with a lower validation loss is an improvement too."""
    if incumbent is None:
        return True
    step = gain(candidate.metric, incumbent.metric, mode)
    if step > min_delta:
        return True
    return min_delta == 0 and step == 0 and candidate.loss < incumbent.loss


def checkpoint_rank(best_rank: float | None, improved: bool) -> float:
    """The rank to report for an epoch: one more than the previous best's when it is the new
    best, otherwise half a step below the current best's (so every epoch after the best ranks
    below it and above every earlier best)."""
    if best_rank is None:
        return 1.0
    return best_rank + 1.0 if improved else best_rank - 0.5


@dataclass
class Patience:
    """Epochs since the last improvement, for early stopping and the plateau schedule.

    One meaning of `patience` for both: act once `patience` validations in a row have not
    improved (with patience 2, at the second epoch without an improvement; patience 0 acts
    at every epoch without one)."""

    patience: int | None
    mode: str
    min_delta: float = 0.0
    best: Score | None = None
    since: int = 0

    def update(self, score: Score) -> bool:
        """Record one validation; returns whether it improved."""
        if better(score, self.best, self.mode, self.min_delta):
            self.best, self.since = score, 0
            return True
        self.since += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.since >= max(self.patience, 1)

    def state_dict(self) -> dict:
        best = None if self.best is None else {"metric": self.best.metric, "loss": self.best.loss}
        return {"best": best, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        best = state.get("best")
        if isinstance(best, dict):
            self.best = Score(best["metric"], best["loss"])
        elif best is not None:  # checkpoints written before the loss tie-break: metric only
            self.best = Score(float(best), float("inf"))
        else:
            self.best = None
        self.since = int(state.get("since", 0))


def pick_checkpoint(found: Sequence[tuple[T, int]], which: str, best_epoch: int | None, where: str) -> T:
    """The checkpoint of the best epoch (`which` "best") or the latest one, from (checkpoint,
    epoch) pairs newest first, wherever they are stored. The best epoch's checkpoint is never
    deleted by the run, so one that is missing means the storage was edited by hand: that is
    an error, not a silent fallback."""
    if not found:
        raise UserError(f"{where}: the run has no checkpoints yet")
    if which != "best":
        return found[0][0]
    matches = [checkpoint for checkpoint, epoch in found if epoch == best_epoch]
    if not matches:
        raise UserError(
            f"{where}: the best epoch's checkpoint (epoch {best_epoch}) is gone (storage edited by "
            f"hand?); kept: epochs {', '.join(str(epoch) for _, epoch in reversed(found))}; "
            "use --checkpoint latest"
        )
    return matches[0]
