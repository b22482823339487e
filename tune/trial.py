"""One trial: the base run config with the trial's values, trained by a TorchTrainer launched
from a Tune function trainable (Train V2: `Tuner(TorchTrainer)` is rejected), or, for
single-worker trials, by the worker loop in the trial's own process (`stoker.tune.inprocess`).

A TorchTrainer trial's trainable reserves a sliver of CPU (`DRIVER_RESOURCES`); its workers
reserve the real resources in their own placement group, which is released when the trainable
stops (`stoker.tune.cleanup`), so a trial that a scheduler stops frees its workers at once. An
in-process trial reserves its one worker's resources for the trainable itself, and its process
runs the next trial too (Tune's reused actors): torch, DeepSpeed and the loop are imported once.
"""

from pathlib import Path
from typing import Any

import ray.data
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from stoker.datasets.ingest import cache_split
from stoker.ray_internals import set_trial_thread_timeout
from stoker.trainer.run import build_trainer, plan_run
from stoker.trainer.run_spec import parse_run
from stoker.tune.checkpoints import (
    finished_result,
    forward_train_checkpoints,
    report_with_pointer,
    train_run_name,
)
from stoker.tune.config import TuneConfig
from stoker.tune.inprocess import report_in_trial, run_in_process
from stoker.tune.schema import SearchRun
from stoker.tune.space import apply, sampled_values


class EpochReports(TuneReportCallback):
    """Tune sees the epochs only: a node drain's mid-epoch checkpoint report
    (stoker.trainer.preemption) carries no validation metric for the scheduler to act on; the
    trial's own Ray Train run resumes from it."""

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and "preempted" in metrics[0]:
            return
        super().after_report(run_context, metrics, checkpoint)

# Not 0: a trainable with no resources can be scheduled without limit and starve the workers.
DRIVER_RESOURCES = {"cpu": 0.01}
TRIALS_DIR = "trials"
# How long a reused in-process trial's process waits for the previous trial to unwind.
REUSE_WAIT_S = 60


def trial_run(base: dict[str, Any], tune_cfg: TuneConfig, values: dict[str, Any], name: str, storage: str,
              model: type[SearchRun]) -> SearchRun:
    """The validated run config of one trial (values by dotted path), of the searched run's
    type `model`."""
    raw = apply(base, values, tune_cfg.space)
    raw.pop("tune", None)
    raw.update(name=name, storage=storage)
    return parse_run(raw, f"trial {name}", model)


def runs_in_process(run: SearchRun, tune_cfg: TuneConfig) -> bool:
    """Whether every trial of this search has one worker and so runs in its trial's process."""
    return tune_cfg.in_process and run.scaling.num_workers == 1 and "scaling.num_workers" not in tune_cfg.space


def shared_train_split(run: SearchRun, tune_cfg: TuneConfig, epochs: int, read_cpus: float) -> ray.data.Dataset | None:
    """The training split read once, in the object store, for every trial of the search to
    cache-read instead of a read of its own, or None when trials would not cache it (a split
    too large, one epoch) or would read different data (the space changes `data.*`).

    Measured on digits (`benchmarks/hpo_efficiency.py`): a trial's own read and materialise was
    a Ray Data execution whose read tasks wait for Ray worker processes started in the trial's
    runtime environment, about 3 of the 5 to 7 s a trial took to start in a reused process.
    """
    if epochs <= 1 or any(key == "data" or key.startswith("data.") for key in tune_cfg.space):
        return None
    return cache_split(run.data.output, "train", read_cpus, ingest=run.data.ingest, s3=run.data.s3)


def make_trainable(base: dict[str, Any], tune_cfg: TuneConfig, experiment_dir: Path, model: type[SearchRun],
                   in_process: bool = False, train_cache: ray.data.Dataset | None = None):
    """The function trainable of a search; `base` is the run config as a dict. `in_process`:
    every trial has one worker and runs the loop itself (see `stoker.tune.inprocess`).
    `train_cache`: the training split every trial reads (`shared_train_split`), handed to the
    trials through the object store (`tune.with_parameters`)."""
    trials_dir = Path(experiment_dir) / TRIALS_DIR

    def stoker_trial(config: dict[str, Any], train_cache: ray.data.Dataset | None = None) -> None:
        trial_id = tune.get_context().get_trial_id()
        name = train_run_name(trial_id, trials_dir, tune.get_checkpoint())
        run = trial_run(base, tune_cfg, sampled_values(config, tune_cfg), name, str(trials_dir), model)
        finished = finished_result(trials_dir / name, run.train.epochs)
        if finished is not None:
            # Trained to the end before the driver died, but not recorded as finished by Tune.
            report_with_pointer(tune.report, finished)
            return
        if in_process:
            # The trial's process runs later trials too (reused actors).
            set_trial_thread_timeout(REUSE_WAIT_S)
            run_in_process(plan_run(run, train_cache=train_cache, score_test=False), report_in_trial)
            return
        forward_train_checkpoints()
        prepared = build_trainer(run, callbacks=[EpochReports()], train_cache=train_cache, score_test=False)
        prepared.trainer.fit()  # raises TrainingFailedError: the trial errors

    return stoker_trial if train_cache is None else tune.with_parameters(stoker_trial, train_cache=train_cache)
