"""Run a search: check it, size its concurrency, start or continue the experiment, collect results.

The experiment directory `<storage>/<tune.name>` holds Tune's own state (one folder per trial,
named by trial id), `trials/<trial id>/` (each trial's Train run: checkpoints, metrics.jsonl),
`stoker_experiment.json` (what defines the search, to refuse resuming a different one) and
the results: results.csv/.parquet, best.yaml, report.html.
"""

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.exceptions import RayTaskError
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import (
    BasicVariantGenerator,
    ConcurrencyLimiter,
    SearchAlgorithm,
    Searcher,
    SearchGenerator,
)

from stoker.atomic import write_json
from stoker.datasets.manifest import Manifest
from stoker.errors import UserError
from stoker.ray_internals import (
    no_credentials_in_trial_env,
    quiet_tune_output,
    tune_fit_environment,
)
from stoker.trainer.resources import plan_resources
from stoker.trainer.run_spec import parse_run
from stoker.tune import algorithms, findings
from stoker.tune.checkpoints import KeepsLastSnapshot, recover_snapshot, restore_deleted_pointers
from stoker.tune.cleanup import ForgetFinishedStatistics, ReleaseStoppedTrials, release_after_search
from stoker.tune.config import Choice, Grid, TuneConfig
from stoker.tune.hyperband import keeps_brackets
from stoker.tune.objectives import (
    check_objectives,
    objectives_of,
    searcher_objectives,
    single_metric_scheduler,
)
from stoker.tune.progress import SearchProgressLog
from stoker.tune.recording import Record, RecordTrials
from stoker.tune.report import write_report
from stoker.tune.results import results_table, write_table
from stoker.tune.schema import SearchRun
from stoker.tune.search_log import SearchLog, curves_of
from stoker.tune.space import (
    apply,
    candidate_values,
    check_space,
    fingerprint,
    nested_points,
    param_space,
    resolve_metric,
)
from stoker.tune.staggered import StaggeredStart
from stoker.tune.storage import experiment_storage, mirrored, staging_notice
from stoker.tune.trial import (
    DRIVER_RESOURCES,
    TRIALS_DIR,
    make_trainable,
    runs_in_process,
    shared_train_split,
)
from stoker.tune.warm_start import load_warm_start

STATE_FILE = "stoker_experiment.json"


def experiment_dir(run: SearchRun) -> Path:
    """Where the search writes its experiment: the directory itself, or its staging copy for
    `s3://` storage (stoker.tune.storage)."""
    return experiment_storage(run).local


def trial_footprint(base: dict[str, Any], tune_cfg: TuneConfig, cluster: dict[str, float],
                    model: type[SearchRun]) -> tuple[float, float]:
    """(CPUs, GPUs) the largest trial of the space reserves for its workers; UserError naming
    the key when one trial cannot fit on the cluster at all."""
    # Scaling fields in the space: the footprint is that of their largest values.
    scaling_paths = [p for p in tune_cfg.space if p.startswith("scaling.")]
    variants = [{}]
    for path in scaling_paths:
        variants = [dict(v, **{path: value}) for v in variants for value in candidate_values(tune_cfg.space[path])]
    cpus = gpus = 0.0
    for values in variants:
        run = parse_run(apply(base, values, tune_cfg.space), "tune", model)
        plan = plan_resources(run.scaling, cluster)  # UserError naming scaling.* if it cannot fit
        cpus = max(cpus, plan.cpus_per_worker * run.scaling.num_workers)
        gpus = max(gpus, plan.gpus_per_worker * run.scaling.num_workers)
    return cpus, gpus


def concurrency(requested: int | None, num_samples: int, footprint: tuple[float, float],
                cluster: dict[str, float], data_cpus: float) -> int:
    """Trials that fit side by side with `data_cpus` left for Ray Data, at most `requested`.

    More trials than fit would each hold a trainable (and its placement-group request) while
    waiting for workers: with every CPU promised, no trial's Ray Data readers could run.
    """
    cpus, gpus = footprint
    spare = float(cluster.get("CPU", 0)) - data_cpus
    fits = math.floor((spare + 1e-9) / (cpus + DRIVER_RESOURCES["cpu"]))
    if gpus:
        fits = min(fits, math.floor(float(cluster.get("GPU", 0)) / gpus + 1e-9))
    if fits < 1:
        raise UserError(
            f"scaling: one trial needs {cpus:g} CPUs and {gpus:g} GPUs plus {data_cpus:g} CPUs for "
            f"Ray Data; the cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs"
        )
    return max(1, min(fits, requested or fits, num_samples))


def _definition(run: SearchRun, metric: str, mode: str) -> dict[str, Any]:
    """What makes two runs of an experiment the same search (resuming another is refused)."""
    tune_cfg = run.tune
    # Values that differ from the defaults: a stoker upgrade that adds a config field (with a
    # default) must not make an unfinished experiment look like a different search.
    base = run.model_dump(mode="json", exclude={"tune", "name"}, exclude_defaults=True)
    return {
        "tune.space": fingerprint({p: d.model_dump(mode="json") for p, d in tune_cfg.space.items()}),
        "tune.searcher": tune_cfg.searcher,
        "tune.scheduler": tune_cfg.scheduler.model_dump(mode="json"),
        "tune.metric": metric,
        "tune.mode": mode,
        "tune.seed": tune_cfg.seed,
        "tune.points_to_evaluate": fingerprint(tune_cfg.points_to_evaluate),
        "base config": fingerprint(base),
        # Only with tune.metrics: experiments started before it existed resume as they were.
        **({"tune.metrics": [o.model_dump(mode="json") for o in tune_cfg.metrics]} if tune_cfg.metrics else {}),
    }


@dataclass
class SearchPlan:
    """A checked search, ready to launch."""

    run: SearchRun
    base: dict[str, Any]
    metric: str
    mode: str
    path: Path
    max_concurrent: int
    epochs: int


def check_search(run: SearchRun) -> tuple[dict[str, Any], str, str]:
    """Every check that needs no cluster (the space, the points to evaluate, the prepared
    dataset, the metric), so bad input is refused before a cluster starts. Returns the base
    config as a dict (local paths absolute) and the metric and mode."""
    if run.tune is None:
        raise UserError("tune: the config has no tune section")
    base = absolute_paths(run.model_dump(mode="json"))
    base["tune"] = None
    check_space(base, run.tune, type(run))  # trials are validated as the searched run's type
    manifest = Manifest.read(base["data"]["output"], run.data.s3)
    metric, mode = resolve_metric(run.tune, manifest.task, run.train.metric)
    objectives = check_objectives(run.tune, manifest.task, run.train.metric)
    if objectives:  # multi-objective: the first is the one schedulers and progress lines use
        metric, mode = objectives[0].name, objectives[0].mode
    load_warm_start(run.tune, [o.name for o in objectives] or [metric])  # refused before a cluster starts
    return base, metric, mode


def plan_search(run: SearchRun, cluster: dict[str, float]) -> SearchPlan:
    """Every check that can fail before any trial starts."""
    base, metric, mode = check_search(run)
    tune_cfg = run.tune
    footprint = trial_footprint(base, tune_cfg, cluster, type(run))
    epochs = run.train.epochs
    if "train.epochs" in tune_cfg.space:
        epochs = max(int(v) for v in candidate_values(tune_cfg.space["train.epochs"]))
    limit = concurrency(tune_cfg.max_concurrent_trials, tune_cfg.num_samples * _grid_size(tune_cfg),
                        footprint, cluster, run.scaling.data_cpus)
    return SearchPlan(run, base, metric, mode, experiment_dir(run), limit, epochs)


def absolute_paths(base: dict[str, Any]) -> dict[str, Any]:
    """The run config (as a dict) with its local paths made absolute, once, on the driver.

    Trials run in other processes, and Tune starts each in a directory of its own: a relative
    `data.output` there names no dataset. Resolved here, every trial and worker reads the
    files the user meant, wherever the command was run from.
    """
    def local(path: str) -> str:
        return path if "://" in path else os.path.abspath(path)

    base = dict(base, storage=local(base["storage"]), data=dict(base["data"]))
    data = base["data"]
    data["output"] = local(data["output"])
    source = data["source"]
    data["source"] = [local(p) for p in source] if isinstance(source, list) else local(source)
    return base


def _grid_size(tune_cfg: TuneConfig) -> int:
    size = 1
    for dist in tune_cfg.space.values():
        if isinstance(dist, Grid) or (tune_cfg.searcher == "grid" and isinstance(dist, Choice)):
            size *= len(dist.values)
    return size


def open_experiment(plan: SearchPlan, resume: bool, fresh: bool) -> bool:
    """Prepare the experiment directory; True when an earlier run of it is continued."""
    path, state_file = plan.path, plan.path / STATE_FILE
    definition = _definition(plan.run, plan.metric, plan.mode)
    if fresh and path.exists():
        shutil.rmtree(path)
    if not state_file.exists():
        if resume:
            raise UserError(f"tune.name: no experiment {path.name!r} to resume at {path}")
        path.mkdir(parents=True, exist_ok=True)
        write_json(state_file, definition)
        return False
    earlier = json.loads(state_file.read_text())
    for key, value in definition.items():
        if earlier.get(key) != value:
            raise UserError(
                f"{key}: differs from the one experiment {path.name!r} was started with; "
                f"use a new tune.name, or --fresh to discard it"
            )
    return tune.Tuner.can_restore(str(path))


def launch(trainable: Callable, *, path: Path, space: dict[str, Any], metric: str, mode: str,
           num_samples: int, max_concurrent: int, searcher=None, scheduler=None,
           time_budget_s: float | None = None, callbacks: list | None = None, restore: bool = False,
           max_failures: int = 0, resources: dict[str, float] | None = None, reuse_actors: bool = False,
           stop: dict[str, Any] | None = None):
    """Run (or continue) a Tune experiment at `path` with stoker's conventions: trials named by
    trial id, a tiny driver reservation, capped concurrency, Tune's own console output off.

    `reuse_actors` runs the next trial in a finished trial's actor instead of starting a new
    process (about a second each on a small machine, several with torch and DeepSpeed): right
    for trials of one process (`search` turns it on for in-process trials), and the scheduler
    is then wrapped so that no starting actor is thrown away (`StartingTrialsKeepTheirActors`).
    A trial that launches a TorchTrainer must not be reused: killing its actor is what takes
    its controller, workers and placement group down at once when a scheduler stops it.
    """
    quiet_tune_output()
    trainable = tune.with_resources(trainable, resources or DRIVER_RESOURCES)
    # (On a restore, Tune takes the callbacks and scheduler pickled when the search started.)
    callbacks = [*(callbacks or []), *keeps_brackets(scheduler), ForgetFinishedStatistics(),
                 KeepsLastSnapshot(path)]
    if reuse_actors:
        scheduler = StartingTrialsKeepTheirActors.wrap(scheduler)
    # None of Tune's per-trial results files (CSV, JSON, tensorboardX; tune_fit_environment turns
    # off the ones Tune would add): the search log (stoker.tune.search_log) holds every trial's
    # curve in one appended file, each trial's Train run writes its own records and event files,
    # and Tune would re-read a file per trial when the search ends (23 s at 10,000 trials).
    starting = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # More one-process trials at once than CPUs, in FIFO order: their processes start a few at a
    # time (see stoker.tune.staggered). Not under HyperBand or PBT, whose pauses and restarts
    # choose the trials to run themselves. Tune would wrap a Searcher itself; the wrapper needs
    # the result.
    staggered = not restore and isinstance(scheduler, StartingTrialsKeepTheirActors) and max_concurrent > starting
    if staggered:
        searcher = StaggeredStart(_search_algorithm(searcher, max_concurrent), starting)
        callbacks.append(searcher.callback)
    if restore:
        # Finished trials stay finished; unfinished and errored ones continue from their last
        # checkpoint; the searcher and scheduler state come back from the experiment state.
        restore_deleted_pointers(path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                num_samples=num_samples, max_concurrent_trials=_concurrency_for_tune(searcher, max_concurrent),
                time_budget_s=time_budget_s,
                trial_name_creator=_trial_id, trial_dirname_creator=_trial_id, reuse_actors=reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=path.name, storage_path=str(path.parent), callbacks=callbacks, verbose=0, stop=stop,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # One pointer per trial: Tune then snapshots the experiment state after every
                # checkpoint (see `restore_deleted_pointers` for the one it may lag behind).
                # (PBT's exploit copies the donor's: stoker.tune.hyperband.DonorKeepingPBT.)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    # Staggered: as many trials asked for ahead as may start (see tune_fit_environment).
    try:
        with tune_fit_environment(max_concurrent if staggered else None), no_credentials_in_trial_env():
            return tuner.fit()
    finally:
        release_after_search()


def _search_algorithm(searcher, max_concurrent: int) -> SearchAlgorithm:
    """`searcher` as the search algorithm Tune would make of it with `max_concurrent_trials`."""
    if searcher is None:
        return BasicVariantGenerator(max_concurrent=max_concurrent)
    if isinstance(searcher, Searcher):
        if not isinstance(searcher, ConcurrencyLimiter):
            searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
        return SearchGenerator(searcher)
    return searcher


class StartingTrialsKeepTheirActors:
    """A FIFO-order scheduler (FIFO, ASHA, median stopping) for a search that reuses actors,
    which leaves the choice of the next PENDING trial to Tune's controller.

    Tune hands a finished trial's actor to the trial its scheduler chooses, and a FIFO-order
    scheduler chooses the oldest PENDING trial: while trials start (every trial at once, at
    the start of a search), that is a trial whose own actor is already starting, and Tune
    then throws that actor away as soon as it is up. The controller's own pass over PENDING
    trials gives the actor to a trial with no actor yet instead (measured at 96 trials, 16 at
    a time: 16 actors started instead of 36). PAUSED trials are still this scheduler's to
    choose. Everything else is the wrapped scheduler's.
    """

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        # FIFO and ASHA never pause a trial: no need to scan every trial each step for one.
        self._pauses = not (type(scheduler) is FIFOScheduler or isinstance(scheduler, AsyncHyperBandScheduler))

    @classmethod
    def wrap(cls, scheduler):
        scheduler = scheduler or FIFOScheduler()
        # HyperBand and PBT choose among PENDING and PAUSED trials by their own rules.
        if type(scheduler).choose_trial_to_run is not FIFOScheduler.choose_trial_to_run:
            return scheduler
        return cls(scheduler)

    def choose_trial_to_run(self, tune_controller):
        if self._pauses:
            for trial in tune_controller.get_trials():
                if trial.status == Trial.PAUSED:
                    return trial
        return None

    def __getattr__(self, name: str):
        # Not for dunders or before __init__ ran (unpickling looks up __setstate__ first).
        if name.startswith("__") or name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)


def _concurrency_for_tune(searcher, max_concurrent: int) -> int | None:
    """`TuneConfig.max_concurrent_trials`: Tune applies it to a model-based `Searcher` (or to the
    generator it makes when there is none); a random/grid `BasicVariantGenerator` carries its
    own (`algorithms.build_searcher`), and Tune would only warn that it ignores this one."""
    return max_concurrent if searcher is None or isinstance(searcher, Searcher) else None


def _trial_id(trial) -> str:
    return trial.trial_id


@dataclass
class SearchOutcome:
    path: Path
    metric: str
    mode: str
    table: Any  # pandas DataFrame, one row per trial
    best_config: Path | None
    report: Path | None
    resumed: bool
    unfinished: list[str]
    """Trials left running by an interrupted search (empty when it ran to the end)."""
    failures: list["TrialFailure"] = field(default_factory=list)
    """Errored trials, in trial order."""
    findings: "findings.Findings | None" = None
    """Pareto front, importance (stoker.tune.findings)."""

    def failure_summary(self) -> tuple[int, str] | None:
        """(exit code, one line) for a search with errored trials: 2 when every trial errored
        and the first one's error is the user's to fix, 1 when every trial errored otherwise,
        0 when only some did; None when none did."""
        if not self.failures:
            return None
        first, count, total = self.failures[0], len(self.failures), len(self.table)
        if count < total:
            return 0, (f"{count} of {total} trials failed; the first, {first.trial}: {first.message} "
                       f"(see {first.path}/error.txt)")
        return (2 if first.user_error else 1), (f"all {total} trials failed; the first, {first.trial}: "
                                                  f"{first.message}")


@dataclass
class TrialFailure:
    trial: str
    path: str
    message: str
    """The error in one line: a user error's own message, else its type and first line."""
    user_error: bool


def trial_failures(results) -> list[TrialFailure]:
    """Errored trials of a result grid, in trial order, each with the error that caused it."""
    failures = []
    for result in results:
        if result.error is None:
            continue
        cause = _user_error(result.error)
        if cause is not None:
            message = str(cause)
        else:
            root = _root_cause(result.error)
            lines = str(root).strip().splitlines()
            message = f"{type(root).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
        failures.append(TrialFailure(Path(result.path).name, result.path, message, cause is not None))
    return failures


def _causes(error: BaseException):
    """The error and what it wraps: a Ray task error's cause, a Train worker group's worker
    failures, chained exceptions."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.append(getattr(current, "cause", None))
        pending.extend(getattr(current, "worker_failures", {}).values())
        pending.append(current.__cause__)


def _user_error(error: BaseException) -> UserError | None:
    # A Ray task error stands for its cause and is an instance of its class too; the cause
    # itself carries the one-line message.
    return next((e for e in _causes(error) if isinstance(e, UserError) and not isinstance(e, RayTaskError)), None)


def _root_cause(error: BaseException) -> BaseException:
    return list(_causes(error))[-1]


def summarise(results, tune_cfg: TuneConfig, metric: str, mode: str, epochs: int, path: Path,
              unfinished: frozenset[str] = frozenset()) -> tuple[findings.Findings, Path]:
    """What a search leaves once its trials are over: results.csv/.parquet, importance, the
    search space for warm starts and report.html; (the findings, with the results table, and
    the report's path). Each trial's curve comes from the search log, one file, not from a
    results file per trial: at 10,000 trials this takes about two seconds."""
    curves = curves_of(results, path, metric)
    table = results_table(results, tune_cfg, metric, mode, epochs, unfinished, curves)
    found = findings.add_findings(results, table, tune_cfg, metric, mode, path)
    write_table(found.table, path)  # with the Pareto front marked (tune.metrics)
    return found, write_report(curves, found.table, metric, mode, path, sections=found.sections)


def search(run: SearchRun, resume: bool = False, fresh: bool = False, emit: Callable[[str], None] = print,
           status_interval_s: float = 30.0, cluster: dict[str, float] | None = None,
           reuse_actors: bool | None = None, record: Record | None = None) -> SearchOutcome:
    """Run the search that `run.tune` describes on the connected cluster and write its results.

    `reuse_actors`: None (the default) reuses in-process trials' processes and nothing else;
    False starts a process per trial (benchmarks/tune_reuse.py's baseline). `record`: records
    each ended trial's Train run in the runs registry (`stoker.tune.recording`)."""
    cluster = cluster or ray.cluster_resources()
    plan = plan_search(run, cluster)
    storage = experiment_storage(run)
    if (notice := staging_notice(storage, sum(1 for node in ray.nodes() if node["Alive"]))) is not None:
        emit(f"stoker: warning: {notice}")
    with mirrored(storage, fresh):
        return _search(plan, resume, fresh, emit, status_interval_s, cluster, reuse_actors, record)


def _search(plan: "SearchPlan", resume: bool, fresh: bool, emit: Callable[[str], None],
            status_interval_s: float, cluster: dict[str, float], reuse_actors: bool | None,
            record: Record | None = None) -> SearchOutcome:
    run = plan.run
    if not fresh and (put_back := recover_snapshot(plan.path)):
        emit(f"stoker: warning: {plan.path.name}'s last experiment snapshot was cut short (its driver ended "
             f"while writing it); continuing from the one before ({', '.join(put_back)})")
    resumed = open_experiment(plan, resume, fresh)
    tune_cfg = run.tune
    emit(f"{'continuing' if resumed else 'starting'} search {plan.path.name}: {tune_cfg.num_samples} trials, "
         f"searcher {tune_cfg.searcher}, scheduler {tune_cfg.scheduler.name}, "
         f"{plan.max_concurrent} at a time, optimising {plan.metric} ({plan.mode})")
    in_process = runs_in_process(run, tune_cfg)
    resources = None
    worker = plan_resources(run.scaling, cluster)
    if in_process:
        # The trial process is the worker: it reserves what the worker would have.
        resources = {"cpu": worker.cpus_per_worker, "gpu": worker.gpus_per_worker}
    # Multi-objective (tune.metrics) and warm start (tune.warm_start): see stoker.tune.objectives
    # and stoker.tune.warm_start. Tune itself takes one metric, so a multi-objective search
    # gives its lists to the searcher and the first metric to the scheduler.
    objectives = objectives_of(tune_cfg)
    warm = load_warm_start(tune_cfg, [o.name for o in objectives] or [plan.metric])
    optuna_options = searcher_objectives(objectives) if objectives else {}
    if warm is not None:
        optuna_options |= warm.optuna_storage(tune_cfg, [o.mode for o in objectives] or [plan.mode])
        if not resumed:  # a continued search has its searcher's state back, warm trials included
            emit(warm.summary())
    progress = SearchProgressLog(plan.metric, plan.mode, plan.epochs, status_interval_s, emit, experiment=plan.path)
    # In-process trials make no placement groups of their own: nothing to release.
    releases = [] if in_process else [ReleaseStoppedTrials()]
    train_cache = shared_train_split(run, tune_cfg, plan.epochs, worker.read_task_cpus)
    recorder = [RecordTrials(plan.path / TRIALS_DIR, plan.metric, plan.mode, record, emit)] if record else []
    results = launch(
        make_trainable(plan.base, tune_cfg, plan.path, type(run), in_process, train_cache),
        path=plan.path, space=param_space(tune_cfg), metric=None if objectives else plan.metric,
        mode=None if objectives else plan.mode,
        num_samples=tune_cfg.num_samples, max_concurrent=plan.max_concurrent,
        searcher=algorithms.build_searcher(tune_cfg, nested_points(tune_cfg), plan.max_concurrent, optuna_options),
        scheduler=single_metric_scheduler(algorithms.build_scheduler(tune_cfg, plan.epochs), objectives),
        time_budget_s=tune_cfg.time_budget_s,
        # The trial log `stoker dashboard` replays (stoker.tune.search_log).
        callbacks=[progress, SearchLog(plan.path, tune_cfg, plan.metric, plan.mode, plan.epochs), *releases, *recorder],
        restore=resumed, max_failures=tune_cfg.max_failures, resources=resources,
        # An in-process trial's process runs the next trial (no second import of torch and
        # DeepSpeed); one that launches a TorchTrainer must end with its trial (see launch).
        reuse_actors=in_process and reuse_actors is not False,
        # PBT would otherwise perturb (pause, copy, restart) trials at their very last epoch.
        stop={algorithms.TIME_ATTR: plan.epochs} if tune_cfg.scheduler.name == "pbt" else None,
    )
    found, report = summarise(results, tune_cfg, plan.metric, plan.mode, plan.epochs, plan.path,
                              frozenset(progress.unfinished))
    table = found.table
    best = findings.write_best(found, plan, plan.path / "best.yaml")
    return SearchOutcome(plan.path, plan.metric, plan.mode, table, best, report, resumed, progress.unfinished,
                         trial_failures(results), found)
