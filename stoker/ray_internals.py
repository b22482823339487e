"""The one seam between stoker and the internals of Ray and DeepSpeed: every private Ray name
stoker uses and every Ray/Tune environment setting it makes, for the releases in `WRITTEN_FOR`
(constraints.txt pins them). Importing this module checks the installed versions: another Ray
or DeepSpeed stops the command with one line naming both versions, instead of a patch release
breaking a private name in the middle of a run or a search. Nothing else in the package imports
a private Ray module or sets a RAY_/TUNE_ variable (tests/stoker/test_layering.py checks).

It sits at the bottom layer (datasets/ uses it) and imports neither Ray nor DeepSpeed itself:
the versions come from the installed distributions, and each private Ray module is imported
when one of its names is first asked for (`_PRIVATE` below). `stoker k8s render` reads the
Ray version without paying Ray's import, and a Ray Data worker that unpickles a function of
`stoker.datasets.ingest` does not import Tune. A name that a future Ray moved fails with one
line naming it (tests/stoker/test_ray_internals.py asks for every one).

What is here has no public equivalent in Ray 2.60:
- Train V2's function-utils hook, its local context and its checkpoint bookkeeping
  (`TrainFnUtils`, `set_train_fn_utils`, `LocalTrainContext`, `CheckpointManager`,
  `StorageContext`, `TrainingReport`, `CheckpointManagerState`): an in-process trial is a Train
  worker with no controller, and a PBT exploit seeds a Train run with a donor's checkpoint in
  Train's own snapshot format;
- Tune's "in a Tune session" check, which Train's API consults at call time;
- the trial session's `report`, where a nested TorchTrainer's forwarded metrics arrive;
- the per-split execution options of a Train `DataConfig`;
- a Ray Data context's execution counter, which seeds each epoch's shuffle;
- Tune's controller `_mark_trial_to_checkpoint`, a trial's running statistics of its metrics
  (`run_metadata`), and the scheduler and BOHB fields that the
  subclasses in `stoker.tune.hyperband` read;
- the GCS placement-group table with each group's creator actor (`placement_group_table()`
  leaves the creator out; the state API needs the dashboard, which stoker does not start);
- the environment variables Tune copies from the driver into every trial's `runtime_env`
  (its actor-class cache), which include AWS credentials;
- the names of Tune's experiment snapshot files and the driver's staging directory they are
  written in, before Tune's syncer copies them in place (stoker keeps the last whole set);
- the driver's printer of raylet and worker output;
- Ray Train's and Tune's settings that exist only as environment variables (the functions
  under "Environment settings"): each is read by Ray when a trainer, a search or a trial
  starts, so each is set just before, and a value the user set wins unless said otherwise.
"""

import contextlib
import functools
import importlib
import importlib.metadata
import json
import logging
import os
import pickletools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stoker.environment import patched_environ
from stoker.errors import UserError

WRITTEN_FOR = {"ray": "2.60.0", "deepspeed": "0.19"}
"""The releases stoker is written against: Ray to the patch release (its private names change
in patch releases), DeepSpeed to the minor series (stoker uses no private DeepSpeed name; its
checkpoint layout and the classes its checkpoints pickle are what must not change)."""


def _installed(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(none)"


def _check(distribution: str) -> str:
    """The installed version of `distribution`; a UserError unless it is `WRITTEN_FOR`'s."""
    pin, installed = WRITTEN_FOR[distribution], _installed(distribution)
    if installed != pin and not installed.startswith(pin + "."):
        wanted = pin if pin.count(".") == 2 else pin + ".*"
        raise UserError(f"{distribution} {installed} is installed, but stoker was written for {distribution} {wanted} "
                        f"(it relies on {distribution}'s internals); install {distribution}=={wanted} "
                        "(pip install -c constraints.txt -e .)")
    return installed


RAY = _check("ray")
_check("deepspeed")

_NEEDS_UPDATING = "stoker.ray_internals needs updating for this Ray"

# name here: (Ray module, its name there). Imported on first use (see the module docstring).
_TRAIN = "ray.train.v2._internal.execution"
_PRIVATE = {
    "CheckpointManager": (f"{_TRAIN}.checkpoint.checkpoint_manager", "CheckpointManager"),
    "CheckpointManagerState": (f"{_TRAIN}.checkpoint.checkpoint_manager", "_CheckpointManagerState"),
    "StorageContext": (f"{_TRAIN}.storage", "StorageContext"),
    "TrainFnUtils": (f"{_TRAIN}.train_fn_utils", "TrainFnUtils"),
    "set_train_fn_utils": (f"{_TRAIN}.train_fn_utils", "set_train_fn_utils"),
    "TrainingReport": (f"{_TRAIN}.training_report", "_TrainingReport"),
    # Ray's local mode builds it; its constructor is not public API.
    "LocalTrainContext": ("ray.train.v2.api.context", "LocalTrainContext"),
}


def _module(name: str) -> Any:
    """Ray's module `name`, or a one-line error naming it when this Ray has no such module."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise RuntimeError(f"ray {RAY}: no module {name!r}; {_NEEDS_UPDATING}") from error


def _attribute(owner: Any, name: str) -> Any:
    """`owner.name`, or a one-line error naming it when this Ray has no such attribute."""
    if not hasattr(owner, name):
        what = getattr(owner, "__name__", type(owner).__name__)
        raise RuntimeError(f"ray {RAY}: {what} has no {name!r}; {_NEEDS_UPDATING}")
    return getattr(owner, name)


def _gcs_pb2() -> Any:
    return _module("ray.core.generated.gcs_pb2")


_COMPUTED: dict[str, Callable[[], Any]] = {
    "PLACEMENT_GROUP_REMOVED": lambda: _gcs_pb2().PlacementGroupTableData.PlacementGroupState.Value("REMOVED"),
    # The AWS credential variables Tune would copy into each trial actor's `runtime_env`.
    "TRIAL_CREDENTIALS": lambda: sorted(
        name for name in _attribute(_module("ray.tune.execution.class_cache"), "ENV_VARS_TO_PROPAGATE")
        if name.startswith("AWS_")),
}

__all__ = [
    "WRITTEN_FOR", "RAY", *_PRIVATE, *_COMPUTED,
    "mark_trial_to_checkpoint", "placement_groups", "private_field", "resolve_execution_options",
    "set_execution_index", "train_api_in_this_thread", "wrap_trial_report", "no_credentials_in_trial_env",
    "driver_output_to_stderr", "print_as_ray",
    "set_train_poll_interval", "use_train_v2", "forget_jobs_api_address", "quiet_tune_output",
    "set_trial_thread_timeout", "tune_fit_environment", "set_train_collective_timeout",
]


def __getattr__(name: str) -> Any:
    """The private names of `_PRIVATE` and `_COMPUTED`, resolved once, on first use."""
    return _resolve(name)


def _resolve(name: str) -> Any:
    if name in globals():
        return globals()[name]
    if name in _PRIVATE:
        module, attribute = _PRIVATE[name]
        value = _attribute(_module(module), attribute)
    elif name in _COMPUTED:
        value = _COMPUTED[name]()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


# ---- Train and Tune hooks -----------------------------------------------------------------

_train_worker = threading.local()


@contextlib.contextmanager
def train_api_in_this_thread() -> Iterator[None]:
    """Within the block, Ray's Train API serves this thread though it runs inside a Tune trial.

    Train's API refuses calls from a Tune trial (it expects a nested trainer there), checking
    `trainable_fn_utils._in_tune_session`, which it looks up at each call. An in-process trial's
    loop is that trial's Train worker: for its thread only, and only until the block ends, the
    check says no. The original is put back after, so nothing outlives the trial.
    """
    tune_fn_utils = _module("ray.tune.trainable.trainable_fn_utils")
    original = _attribute(tune_fn_utils, "_in_tune_session")

    def in_tune_session() -> bool:
        return False if getattr(_train_worker, "active", False) else original()

    tune_fn_utils._in_tune_session = in_tune_session
    _train_worker.active = True
    try:
        yield
    finally:
        _train_worker.active = False
        tune_fn_utils._in_tune_session = original


def wrap_trial_report(wrap: Callable[[Callable], Callable]) -> None:
    """Replace this trial's session `report` by `wrap(report)`.

    A nested TorchTrainer's `TuneReportCallback` hands rank 0's metrics to the trial's session
    through a queue, and the session calls its own `report` with them on the trial's thread:
    the one place a Tune checkpoint can be attached. The session is the trial's and ends with
    it (trials that launch a TorchTrainer never reuse their process).
    """
    session = _attribute(_module("ray.train._internal.session"), "get_session")()
    if session is None:
        raise RuntimeError("wrap_trial_report: not inside a Tune trial")
    session.report = wrap(_attribute(session, "report"))


def resolve_execution_options(data_config: Any, split: str) -> Any:
    """The Ray Data execution options a Train `DataConfig` gives the dataset of `split`."""
    return _attribute(data_config, "_resolve_execution_options")(split)


def set_execution_index(context: Any, index: int) -> None:
    """Number the next execution of a dataset with this `DataContext` `index`.

    Ray counts a dataset's executions from its context's index (a materialise counts too) and
    reseeds a shuffle with it (`RandomSeedConfig(reseed_after_execution=True)`): setting it makes
    the first training pass epoch `index`, whatever ran before. Checked before it is written,
    so a Ray without it fails here instead of silently reseeding from 0.
    """
    _attribute(context, "_execution_idx")
    context._execution_idx = index


def mark_trial_to_checkpoint(tune_controller: Any, trial: Any) -> None:
    """Have Tune save `trial`'s status with the next experiment snapshot."""
    _attribute(tune_controller, "_mark_trial_to_checkpoint")(trial)


def forget_trial_statistics(trial: Any) -> None:
    """Drop a finished trial's running statistics of its metrics: Tune keeps, for every number a
    trial ever reported, its max/min/avg/last and the last 5 and 10 values in deques, for the
    life of the search and in every experiment snapshot (about 15 KiB of the driver's memory
    per trial). Nothing reads them once the trial has ended but Tune's own best-trial helpers,
    which stoker does not use (its results come from the search log). A trial that runs again
    (an errored one retried) starts them afresh: Tune creates a metric's entry on its first
    report."""
    metadata = _attribute(trial, "run_metadata")
    metadata.metric_analysis.clear()
    metadata.metric_n_steps.clear()
    metadata.invalidate_cache()


# Tune's experiment snapshot: one set of files per driver session, which Tune writes in the
# driver's staging directory and its syncer then copies into the experiment directory, in a
# thread, writing each file in place (Ray 2.60's names). A driver killed during that copy leaves
# cut files, and a resume that reads a cut experiment state starts the search over.
SNAPSHOT_FILES = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
                  "callback-states-*.pkl")


def driver_staging_dir(trial: Any) -> Path:
    """The driver's staging directory of a trial's experiment, where Tune writes each snapshot
    whole (in the thread that steps the search) before its syncer copies it."""
    return Path(_attribute(_attribute(trial, "storage"), "experiment_driver_staging_path"))


def snapshot_files(directory: Path) -> list[Path]:
    """Tune's experiment snapshot files in `directory`, every session's."""
    return sorted(f for pattern in SNAPSHOT_FILES for f in directory.glob(pattern))


def newest_experiment_state(directory: Path) -> Path | None:
    """The newest session's experiment state file in `directory` (session names are times)."""
    return max(directory.glob(SNAPSHOT_FILES[0]), default=None)


def whole(file: Path) -> bool:
    """A snapshot file reads to its end: JSON that parses, or a pickle whose opcodes reach STOP."""
    try:
        if file.suffix == ".json":
            json.loads(file.read_bytes())
        else:
            with file.open("rb") as handle:
                for _ in pickletools.genops(handle):
                    pass
        return True
    except (ValueError, OSError):
        return False


def private_field(owner: Any, name: str) -> Any:
    """A field Ray keeps private on one of its schedulers or searchers (`_time_attr`, ...)."""
    return _attribute(owner, name)


def placement_groups() -> list[Any]:
    """Every placement group the GCS knows, as `gcs_pb2.PlacementGroupTableData` records."""
    state = _attribute(_module("ray._private.state"), "state")
    records = _gcs_pb2().PlacementGroupTableData
    return [records.FromString(raw) for raw in _attribute(state, "_connect_and_get_accessor")().get_placement_group_table()]


@contextlib.contextmanager
def no_credentials_in_trial_env() -> Iterator[None]:
    """While the block runs, this process's environment lacks the AWS credentials that Tune
    copies from it into every trial actor's `runtime_env`, where the state API, the dashboard
    and the GCS would show them. Trials get credentials as every other Ray worker here does:
    from their node (the environment the local cluster was started with, or the platform's AWS
    chain: instance profile, IRSA). The driver's own S3 reads happen outside the block."""
    with patched_environ(dict.fromkeys(_resolve("TRIAL_CREDENTIALS"))):
        yield


# ---- The driver's output --------------------------------------------------------------------

def driver_output_to_stderr() -> None:
    """Send everything Ray prints in this (driver) process to stderr: the raylet's warnings
    (`(raylet) WARNING: ...`, printed to stdout by the driver's error listener whatever
    `log_to_driver` says) and, with `log_to_driver`, the workers' output. stoker's stdout is its
    own result (tables, one JSON document with `--json`), which a pipe must be able to parse.

    Both of Ray's printers look `print_to_stdstream` up when they print (the error listener) or
    bind it at `ray.init` (the log printer), so this must run before `ray.init`; it is idempotent.
    """
    worker = _module("ray._private.worker")
    original = _attribute(worker, "print_to_stdstream")
    if getattr(original, "_stoker_to_stderr", False):
        return

    @functools.wraps(original)
    def to_stderr(data, ignore_prefix: bool):
        return original({**data, "is_err": True}, ignore_prefix)

    to_stderr._stoker_to_stderr = True
    worker.print_to_stdstream = to_stderr


def print_as_ray(lines: list[str], pid: str = "raylet") -> None:
    """Print `lines` the way Ray's driver prints a raylet's message (for tests of the above)."""
    _module("ray._private.worker").print_to_stdstream({"lines": lines, "pid": pid, "is_err": False},
                                                      ignore_prefix=False)


# ---- Environment settings -------------------------------------------------------------------

def _default(name: str, value: str) -> None:
    os.environ.setdefault(name, value)  # a user's own setting wins


def set_train_poll_interval() -> None:
    """Before `TorchTrainer.fit()`, which hands it to its controller: Ray Train V2's controller
    collects a report at its health-check poll, every 2 s by default, and a worker's next
    report waits until the previous one was collected (a queue of one), so short epochs came
    2, 4, 6 s apart. A poll is one small actor call per worker; a missed one is only a warning
    after minutes (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S)."""
    _default("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def set_train_collective_timeout(seconds: float) -> None:
    """Before `TorchTrainer.fit()`, which hands it to its controller and workers: Ray Train's
    own collective, the barrier in every `ray.train.report`, waits forever by default; the
    run's `train.collective_timeout_s` bounds it as it bounds torch's collectives, and Ray's
    timeout error names the ranks that did not join. Here the run's setting wins over the
    environment's: it is the documented one, and each run of a process sets its own."""
    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = repr(float(seconds))


def job_stop_wait(seconds: int) -> dict[str, str]:
    """For a submitted job's runtime_env: how long `ray job stop` (`stoker jobs stop`) lets the
    driver run after its SIGTERM before a SIGKILL (3 s by default). Read by the job's
    supervisor, which gets the job's env_vars."""
    return {"RAY_JOB_STOP_WAIT_TIME_S": str(seconds)}


def use_train_v2() -> None:
    """Before `ray.init`: Ray Train V2 is the default in 2.60; pinning it makes the choice visible."""
    _default("RAY_TRAIN_V2_ENABLED", "1")


def forget_jobs_api_address() -> None:
    """Before a local `ray.init`: an http(s) RAY_ADDRESS names a Jobs API for `stoker submit`;
    `ray.init` would otherwise read it and try to join that cluster as a client."""
    os.environ.pop("RAY_ADDRESS", None)


class _NoTrialResultFiles(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics for")


def quiet_tune_output() -> None:
    """Before a search: every trial checkpoints (a pointer) each epoch, so Tune would warn on
    every experiment snapshot; Tune's newer console output prints an experiment box even at
    verbose=0, where stoker prints its own; and a search writes no per-trial results files
    (its search log holds the curves), which Tune's result grid, built as the search ends,
    warns about for every trial."""
    _default("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _default("RAY_AIR_NEW_OUTPUT", "0")
    analysis = logging.getLogger("ray.tune.analysis.experiment_analysis")
    if not any(isinstance(f, _NoTrialResultFiles) for f in analysis.filters):
        analysis.addFilter(_NoTrialResultFiles())


def set_trial_thread_timeout(seconds: int) -> None:
    """In a trial whose process runs later trials too (reused actors): Tune resets it only after
    the trial's thread has unwound, and gives up (failing the next trial) after 2 s by default,
    short for a stopped trial's teardown on a busy machine."""
    _default("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(seconds))


@contextlib.contextmanager
def tune_fit_environment(max_pending_trials: int | None = None) -> Iterator[None]:
    """Around `Tuner.fit()`, which reads these while it assembles its callbacks and (the second)
    when its controller starts, and put back after: no automatic logger callbacks (a search's
    curves are in its search log), and, given `max_pending_trials`, as many trials asked
    for ahead: Tune sizes that by its searcher's type, and would take a wrapping searcher for a
    model-based one (one at a time). A user's own TUNE_MAX_PENDING_TRIALS_PG wins."""
    settings: dict[str, str | None] = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    if max_pending_trials is not None and "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ:
        settings["TUNE_MAX_PENDING_TRIALS_PG"] = str(max_pending_trials)
    with patched_environ(settings):
        yield
