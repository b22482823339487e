"""Tune-level checkpoints for trials whose real checkpoints belong to Ray Train.

Inside Tune, Train V2's `TuneReportCallback` forwards rank 0's metrics and the path of the
Train checkpoint (as `checkpoint_path`), but the Tune trial itself gets no checkpoint. Tune needs
one to pause and resume trials (HyperBand), to keep a trial's epoch count across an experiment
restore, and for population-based training to copy a good trial into a bad one. So each
forwarded report carries a tiny Tune checkpoint: a pointer to the Train checkpoint.

A trial that starts from a pointer into its own Train run just rebuilds the trainer with the
same run name (Train resumes from that run's latest checkpoint). A pointer into another trial's
run (PBT's exploit step) seeds a new Train run for this trial with a copy of that checkpoint.
"""

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback

from stoker.atomic import atomic_directory, atomic_file
from stoker.ray_internals import (
    CheckpointManagerState,
    driver_staging_dir,
    newest_experiment_state,
    snapshot_files,
    whole,
    wrap_trial_report,
)

POINTER = "train_checkpoint.json"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train forwards
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


def forward_train_checkpoints() -> None:
    """Make every report that names a Train checkpoint also register a Tune pointer checkpoint.

    TuneReportCallback hands its metrics to the trial's session, which calls `session.report`
    on the trial's main thread; that is the one place where a checkpoint can be attached.
    """
    def wrap(original):
        def report(metrics: dict[str, Any], checkpoint=None) -> None:
            if checkpoint is not None:
                return original(metrics, checkpoint=checkpoint)
            return report_with_pointer(original, metrics)
        return report

    wrap_trial_report(wrap)


def report_with_pointer(report, metrics: dict[str, Any]) -> None:
    """`report(metrics, checkpoint=...)` with a Tune pointer checkpoint to the Train checkpoint
    that `metrics` names (none if it names none)."""
    path = metrics.get(CHECKPOINT_PATH_KEY)
    if not path:
        return report(metrics, checkpoint=None)
    with tempfile.TemporaryDirectory() as directory:
        pointer = {"path": path, "run_dir": str(Path(path).parent), "epoch": metrics.get("epoch")}
        (Path(directory) / POINTER).write_text(json.dumps(pointer))
        return report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def read_pointer(checkpoint) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        file = Path(directory) / POINTER
        return json.loads(file.read_text()) if file.exists() else None


SNAPSHOT_COPY = ".stoker-snapshot"
"""The experiment's last whole Tune snapshot, kept by `KeepsLastSnapshot`."""


class KeepsLastSnapshot(Callback):
    """Keeps a copy of Tune's last experiment snapshot that is always whole.

    Tune writes each snapshot in the driver's staging directory and then copies it into the
    experiment directory in a thread, writing each file in place: a driver killed during that
    copy (a preempted head node) leaves a cut experiment state, and the resume would start the
    whole search over. After each of Tune's steps (its snapshot, when it takes one, is written
    by then, in the same thread) this copies a new snapshot from the staging directory into
    `<experiment>/.stoker-snapshot`, replaced as a whole directory; `recover_snapshot` puts it
    back before a resume. The copy is a file copy of what Tune has just serialised, a small
    part of a snapshot's own cost."""

    LIST_EVERY_S = 1.0
    """How often the staging directory is listed until this driver's first snapshot is in it."""

    def __init__(self, experiment: Path) -> None:
        self.experiment = experiment
        self._started = time.time()  # this driver's start (`setup`): its own snapshots are newer
        self._staging: Path | None = None  # the driver's staging directory of the experiment
        self._state: Path | None = None  # this driver's experiment state in it, once written
        self._looked = 0.0  # when the staging directory was last listed for it
        self._copied: int | None = None  # that file's mtime when last copied

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "_started": 0.0, "_staging": None, "_state": None,
                "_looked": 0.0, "_copied": None}

    def setup(self, **info) -> None:
        self._started = time.time()

    def on_step_end(self, iteration, trials, **info) -> None:
        # One stat a step once this driver's experiment state is known (Tune steps many times a
        # second); until then a listing at most once a second (a resumed search's staging
        # directory also holds the earlier driver's files); a copy only after a new snapshot.
        if self._staging is None:
            if not trials:
                return
            self._staging = driver_staging_dir(trials[0])
        try:
            if self._state is None and time.monotonic() - self._looked >= self.LIST_EVERY_S:
                self._looked = time.monotonic()
                newest = newest_experiment_state(self._staging)
                if newest is not None and newest.stat().st_mtime >= self._started:
                    self._state = newest
            written = self._state.stat().st_mtime_ns if self._state is not None else None
        except FileNotFoundError:
            return
        if written is None or written == self._copied:
            return
        self._copied = written
        with atomic_directory(self.experiment / SNAPSHOT_COPY) as copy:
            for file in snapshot_files(self._staging):
                shutil.copyfile(file, copy / file.name)


def recover_snapshot(experiment: Path) -> list[str]:
    """Before a resume: when a Tune snapshot file in the experiment directory does not read
    whole (its copy was cut by the driver's end), put the last whole snapshot back; the files
    put back."""
    if all(whole(f) for f in snapshot_files(experiment)):
        return []
    kept = experiment / SNAPSHOT_COPY
    copies = snapshot_files(kept) if kept.is_dir() else []
    for file in snapshot_files(experiment):
        if not whole(file):
            file.unlink()  # with no copy to put back, Tune reads the newest whole one
    for copy in copies:
        with atomic_file(experiment / copy.name) as target:
            shutil.copyfile(copy, target)
    return [copy.name for copy in copies]


def restore_deleted_pointers(experiment: Path) -> list[Path]:
    """Put back the pointer checkpoint that an experiment snapshot may still name; returns the
    directories recreated.

    Tune keeps one checkpoint per trial (a pointer) and, with that limit, snapshots the
    experiment state after every checkpoint: the snapshot lags at most one checkpoint. But the
    previous one is deleted before that snapshot is written, so a driver killed in between
    leaves a snapshot naming a deleted checkpoint, and restoring that trial fails. Its latest
    pointer leads to the same Train run (which resumes from its own latest checkpoint), so a
    copy of it under the previous name is as good. (Keeping every pointer instead would end
    the forced snapshots, and Tune then restores a paused trial's progress.csv from a stale
    copy, losing rows.)
    """
    made = []
    for trial in experiment.iterdir():
        checkpoints = sorted(trial.glob("checkpoint_*")) if trial.is_dir() else []
        if not checkpoints:
            continue
        latest = checkpoints[-1]
        index = int(latest.name.removeprefix("checkpoint_"))
        previous = trial / f"checkpoint_{index - 1:06d}"
        if index > 0 and not previous.exists() and (latest / POINTER).exists():
            with atomic_directory(previous) as staging:
                shutil.copytree(latest, staging, dirs_exist_ok=True)
            made.append(previous)
    return made


def finished_result(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The last report of a Train run that has nothing left to train (its latest checkpoint is
    the last epoch's, or an early stop's), with that checkpoint's path; None otherwise.

    A driver killed after a trial's last epoch but before Tune snapshotted its experiment state
    leaves the trial unfinished in that snapshot. Resumed, the trial must hand Tune this result
    again: Train would resume after the last epoch and report nothing.
    """
    snapshot = run_dir / SNAPSHOT
    if not snapshot.exists():
        return None
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    if not latest:
        return None
    metrics = latest["metrics"]
    if metrics.get("epoch") != epochs - 1 and not metrics.get("early_stopped"):
        return None
    return {**metrics, CHECKPOINT_PATH_KEY: str(run_dir / latest["checkpoint_dir_name"])}


def train_run_name(trial_id: str, trials_dir: Path, checkpoint) -> str:
    """The Train run this trial continues: its own, or a new one seeded from a donor's checkpoint."""
    pointer = read_pointer(checkpoint)
    if pointer is None:
        return trial_id
    # Read by name under this experiment's trials/: the experiment may have moved since the
    # pointer was written (an s3:// search continued from another machine's staging copy).
    run_dir = trials_dir / Path(pointer["run_dir"]).name
    if run_dir.name == trial_id or run_dir.name.startswith(f"{trial_id}."):
        return run_dir.name
    generation = 1
    while (trials_dir / f"{trial_id}.{generation}").exists():
        generation += 1
    name = f"{trial_id}.{generation}"
    seed_run(trials_dir / name, run_dir / Path(pointer["path"]).name)
    return name


def seed_run(run_dir: Path, source: Path) -> None:
    """Create a Train run directory whose latest checkpoint is a copy of `source`, so a trainer
    built with that run name resumes from it.

    The snapshot format is Ray Train V2's own (`CheckpointManagerState`, through the seam); the
    donor's entry keeps its metrics so best-checkpoint ranking still works.
    """
    donor = CheckpointManagerState.parse_raw((source.parent / SNAPSHOT).read_text())
    entries = {entry.checkpoint_dir_name: entry for entry in donor.checkpoint_results}
    if source.name not in entries or not source.exists():
        # The donor moved on and deleted that checkpoint (it keeps only a few): take its latest.
        latest = donor.latest_checkpoint_result
        if latest is None:
            raise RuntimeError(f"{source.parent}: no checkpoint to copy")
        source, entries = source.parent / latest.checkpoint_dir_name, {latest.checkpoint_dir_name: latest}
    entry = entries[source.name]
    with atomic_directory(run_dir) as staging:
        shutil.copytree(source, staging / source.name)
        state = CheckpointManagerState(
            checkpoint_results=[entry],
            checkpoint_report_indices=[0],
            latest_checkpoint_result=entry,
            pending_training_results=[],
            pending_validation_specs=[],
            current_report_index=1,
            validated_checkpoint_dir_names=[],
            timed_out_validation_checkpoint_dir_names=[],
            failed_validation_checkpoint_dir_names=[],
        )
        (staging / SNAPSHOT).write_text(state.json())
