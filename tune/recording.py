"""A search's trials in the runs registry: each trial's Train run is recorded when the trial
ends (succeeded, or failed with where its error is), with the best epoch of its metrics.jsonl
by the search's metric, in the registry the search's config records into, beside the
trainings recorded there.

The registry sits above this package (`stoker.cluster`), so the CLI hands the writing in as
`record(run_dir, status, fields)`; this module only says which run and what to write. A
failure to record is said in one line and the search goes on: a registry that is down for a
moment must not throw away the trials' training.
"""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from stoker.trainer.ranking import Score, better
from stoker.trainer.run_dir import Records
from stoker.tune.checkpoints import CHECKPOINT_PATH_KEY

Record = Callable[[Path, str, dict[str, Any]], None]


def trial_run_dir(trials_dir: Path, trial) -> Path:
    """The Train run a trial trained last: the one its last checkpoint belongs to (a PBT trial
    moves to `<trial id>.<generation>`), else its own."""
    path = (trial.last_result or {}).get(CHECKPOINT_PATH_KEY)
    return trials_dir / (Path(path).parent.name if path else trial.trial_id)


def best_fields(run_dir: Path, metric: str, mode: str) -> dict[str, Any]:
    """Registry fields of a trial's best epoch by `metric` (on an equal value the lower
    validation loss, the training's own rule): metric, best_epoch, score, its validation
    metrics and checkpoint. Empty when no epoch has the metric."""
    best, best_record = None, None
    for record in Records(run_dir).metrics():
        value, loss = record.get(metric), record.get("val_loss")
        if not isinstance(value, int | float) or math.isnan(value):
            continue
        score = Score(float(value), float(loss) if isinstance(loss, int | float) else math.inf)
        if better(score, best, mode):
            best, best_record = score, record
    if best_record is None:
        return {}
    validation = {k.removeprefix("val_"): v for k, v in best_record.items()
                  if k.startswith("val_") and isinstance(v, int | float)}
    return {"metric": metric, "best_epoch": best_record.get("epoch"), "score": best.metric,
            "metrics": {"validation": validation}, "checkpoint": best_record.get("checkpoint")}


class RecordTrials(Callback):
    """Records each ended trial through `record`; `warn` says a failed recording in one line."""

    def __init__(self, trials_dir: Path, metric: str, mode: str, record: Record,
                 warn: Callable[[str], None]) -> None:
        self.trials_dir, self.metric, self.mode = Path(trials_dir), metric, mode
        self.record, self.warn = record, warn

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._record(trial, "succeeded", None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._record(trial, "failed", f"trial {trial.trial_id} failed: see {trial.path}/error.txt")

    def _record(self, trial, status: str, error: str | None) -> None:
        run_dir = trial_run_dir(self.trials_dir, trial)
        if not Records(run_dir).exists():
            return  # failed before its Train run began: nothing to tie a record to
        try:
            self.record(run_dir, status, {**best_fields(run_dir, self.metric, self.mode), "error": error})
        except Exception as exc:  # noqa: BLE001 - said, and the search goes on (module docstring)
            self.warn(f"stoker: warning: trial {trial.trial_id} not recorded in the registry: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
