"""The driver side of a training run: check, size, launch the TorchTrainer, write the run dir.

The run directory `<storage>/<name>` holds Ray Train's checkpoints plus stoker's records:
config.yaml (resolved), dataset.json (manifest fingerprint and input shape),
deepspeed_config.json, metrics.jsonl (one line per epoch, written as epochs finish),
tensorboard/ (event files), final_metrics.json and report.html with its PNGs. On `s3://`
storage the records are written to a local staging copy of the run directory and uploaded when
the run ends (stoker.trainer.run_dir).
"""

import json
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from stoker.datasets.ingest import ingest_kwargs, read_split, split_files
from stoker.datasets.manifest import SPLITS, Manifest
from stoker.datasets.storage import is_s3
from stoker.errors import UserError
from stoker.ray_internals import set_train_collective_timeout, set_train_poll_interval
from stoker.trainer import checkpoint_resize as resize
from stoker.trainer import checkpoints as ckpt
from stoker.trainer import metrics as m
from stoker.trainer.deepspeed_config import deepspeed_config, optimizer_steps
from stoker.trainer.losses import class_weights, resolve_name
from stoker.trainer.models import (
    InputSpec,
    build_model,
    check_model,
    parameter_count,
    resolve_model,
    spec_from_manifest,
)
from stoker.trainer.plan import WorkerPlan
from stoker.trainer.ranking import CHECKPOINT_RANK
from stoker.trainer.resources import can_stream, plan_resources
from stoker.trainer.run_dir import FinalMetrics, Records, RunDir, locate
from stoker.trainer.run_spec import RunSpec
from stoker.trainer.stop_flag import STOP_WAIT_S, StopFlag
from stoker.trainer.targets import training_target_scale
from stoker.trainer.tracking import MlflowLog, RunLog, TensorBoardLog, flatten


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    metric: str
    test: dict[str, float]
    validation: dict[str, float]
    stopped_early: bool = False
    location: str | None = None
    """Where the run directory lives: `run_dir` itself, or its `s3://` URI (then `run_dir` is
    the local staging copy of its records)."""


def follow(path: Path, emit: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    """Call `emit` with each new line of a JSONL file until `stop` is set (then drain it)."""
    offset = path.stat().st_size if path.exists() else 0
    while True:
        stopping = stop.wait(0.5)
        if path.exists():
            if path.stat().st_size < offset:  # epochs dropped to run again after a restart
                offset = path.stat().st_size
            with open(path) as handle:
                handle.seek(offset)
                for line in handle:
                    if line.endswith("\n"):
                        emit(json.loads(line))
                        offset += len(line.encode())
        if stopping:
            return


@dataclass
class PreparedRun:
    """A checked run, its run directory written, and the TorchTrainer that will execute it."""

    trainer: TorchTrainer
    run_dir: Path
    metric: str
    manifest: Manifest
    spec: InputSpec | None = None
    notices: list[str] = field(default_factory=list)
    """Things the user should know before training starts (e.g. a corrupt checkpoint skipped)."""
    log: RunLog | None = None
    storage: RunDir | None = None
    stop_flag: Any = None
    """The driver's `StopFlag` actor: raised on Ctrl-C/SIGTERM so the workers checkpoint first."""


# Built-in models up to this size are shape-checked for real on the CPU (milliseconds, tens of
# MB); larger ones on the meta device, whose first forward imports torch._dynamo (1.8 s here,
# on the driver of every run).
CPU_CHECK_MAX_PARAMS = 10_000_000


def _check_model(run: RunSpec, spec: InputSpec) -> int:
    """Shape-check the model against the dataset; returns its parameter count."""
    if run.model.name == "custom":
        return check_model(run.model, spec)  # user code may create CPU tensors: run it for real
    with torch.device("meta"):  # building on the meta device allocates nothing
        params = parameter_count(build_model(run.model, spec))
    with torch.device("cpu" if params <= CPU_CHECK_MAX_PARAMS else "meta"):
        return check_model(run.model, spec)


def _check_same_input(run_dir: Path, spec: InputSpec, manifest: Manifest, has_checkpoints: bool) -> None:
    """A resumed run must see data shaped like the data its checkpoints were trained on."""
    before = Records(run_dir).dataset()
    if before is None or not has_checkpoints:
        return
    shape = before.get("input_shape")
    if shape is not None and list(shape) != list(spec.input_shape):
        raise UserError(
            f"data.output: the dataset's input shape is {list(spec.input_shape)} but run "
            f"{run_dir.name} was trained on {shape}; use a new run name or --fresh"
        )
    if before.get("num_classes") not in (None, manifest.num_classes):
        raise UserError(
            f"data.output: the dataset has {manifest.num_classes} classes but run {run_dir.name} "
            f"was trained on {before['num_classes']}; use a new run name or --fresh"
        )


def _check_checkpoints(run_dir: Path, run: RunSpec, spec: InputSpec) -> tuple[list[str], int, int | None]:
    """Pick the checkpoint the run resumes from before Ray starts the workers; return notices,
    the epoch the run resumes at (0 for a new run) and the optimizer steps taken before it
    (None if unknown). The newest checkpoint wins unless it fails its checksums, or it was
    saved at another world size or ZeRO stage and cannot be converted (the record of its
    conversion is kept beside it, stoker.trainer.checkpoint_resize): then the newest intact earlier one, as
    the workers do. A model that no longer matches the checkpoint is refused before anything
    on disk changes. The metrics logged after the checkpoint the run resumes from (a corrupt
    one, or epochs between `train.checkpoint.every` saves) are dropped here so they are not
    listed twice when the epochs run again."""
    found = ckpt.local_checkpoints(run_dir)
    if not found:
        return [], 0, None
    now = (run.scaling.num_workers, run.train.deepspeed.zero_stage)
    first_problem = None
    for candidate in found:
        problem = ckpt.verify(candidate)
        if problem is None:
            _check_same_model(candidate, run, spec)
            try:
                resize.prepare(candidate, *now)
            except resize.ConversionError as error:
                problem = f"cannot be converted for {now[0]} workers at ZeRO stage {now[1]} ({error})"
            else:
                epoch, state = ckpt.epoch_of(candidate), ckpt.read_state(candidate)
                _drop_metrics_after(run_dir, epoch)
                notices = [] if first_problem is None else [
                    f"checkpoint {found[0].name} {first_problem}; resuming from {candidate.name} (epoch {epoch})"]
                return notices, epoch + 1, state.get("global_steps")
        else:
            problem = f"is corrupt ({problem})"
        first_problem = first_problem or problem
    raise UserError(f"{found[0]}: checkpoint {first_problem} and no earlier checkpoint is intact; rerun with --fresh")


def _check_same_model(checkpoint: Path, run: RunSpec, spec: InputSpec) -> None:
    """The run's model must have the parameters (names and shapes) its checkpoint was saved
    with; otherwise DeepSpeed would fail in every worker, once per restart."""
    saved = ckpt.read_state(checkpoint).get("parameters")
    if saved is None:
        return  # saved before stoker recorded them
    try:
        with torch.device("meta"):  # allocates nothing
            now = {n: list(p.shape) for n, p in build_model(run.model, spec).named_parameters()}
    except Exception:  # noqa: BLE001 - a custom model that cannot be built on meta: DeepSpeed checks it
        return
    problem = resize.check_shapes(saved, now)
    if problem:
        raise UserError(
            f"model: run {run.name} was trained with another model than this config's ({problem}, checkpoint "
            f"{checkpoint.name}); use the model it was trained with, a new run name, or --fresh"
        )


def _continue_schedule(ds_config: dict[str, Any], steps_done: int | None, resume_epoch: int, epochs: int,
                       steps_per_epoch: int) -> None:
    """A resumed run's step-driven schedule ends where the run ends: the steps already taken
    plus the remaining epochs at today's steps per epoch. The same as an uninterrupted run's
    total at an unchanged world size; after a resize (steps per epoch change with it) the
    schedule's position, restored from the checkpoint in optimizer steps, stays consistent."""
    params = ds_config.get("scheduler", {}).get("params", {})
    if steps_done is not None and "total_num_steps" in params:
        params["total_num_steps"] = max(steps_done + (epochs - resume_epoch) * steps_per_epoch, 1)


def _resume_epoch_on_s3(storage: RunDir) -> int:
    """The epoch a run on S3 resumes at: after its newest checkpoint (Ray resumes from that
    one; the workers verify its checksums once they have downloaded it). Its pickles are
    checked here first, where they lie: a tampered checkpoint is refused before Ray starts
    workers that would only fail on it. Metrics logged after it are dropped, as
    `_check_checkpoints` does."""
    found = storage.checkpoints()
    if not found:
        return 0
    storage.check_checkpoint(found[0][0])
    _drop_metrics_after(storage.local, found[0][1])
    return found[0][1] + 1


def _drop_metrics_after(run_dir: Path, epoch: int) -> None:
    Records(run_dir).drop_metrics(from_epoch=epoch + 1)


def _ingest_options(run: RunSpec, manifest: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for `read_split` (driver) and `iter_split` (workers)."""
    read = {"ingest": run.data.ingest, "s3": run.data.s3, "seed": run.train.seed, "manifest": manifest}
    return read, ingest_kwargs(run.data.ingest, manifest)



def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    # The driver only names this function (Ray pickles it by reference), so the loop's
    # imports (DeepSpeed, torchmetrics) are paid in the workers, which need them, not here.
    from stoker.trainer.hangs import bounded_collectives
    from stoker.trainer.loop import train_loop_per_worker

    with bounded_collectives(config["plan"].train.collective_timeout_s):
        return train_loop_per_worker(config)


@dataclass
class CheckedRun:
    """A run checked against its dataset and the cluster: what the later steps need."""

    run: RunSpec
    """The run with its model resolved (`model.name` left out: the modality's default)."""
    manifest: Manifest
    spec: InputSpec
    param_count: int
    class_weights: Any
    resources: Any
    """The per-worker resources (stoker.trainer.resources.plan_resources)."""
    metric: str
    steps: int
    """Optimizer steps of the whole run at its planned world size."""


def check_run(run: RunSpec, cluster_resources: dict | None = None) -> CheckedRun:
    """Check a validated run against its prepared dataset and the cluster; a UserError names
    the key at fault. Writes nothing."""
    manifest = Manifest.read(run.data.output, run.data.s3)
    if manifest.task != run.data.task:
        raise UserError(
            f"data.task: {run.data.task} but the dataset at {run.data.output} was prepared for "
            f"{manifest.task}; prepare it again"
        )
    loss_name = resolve_name(run.train.loss, manifest.task)
    if loss_name == "bce" and manifest.num_classes != 2:
        raise UserError(f"train.loss.name: bce needs exactly 2 classes; the dataset has {manifest.num_classes}")
    spec = spec_from_manifest(manifest, loss_name)
    run = run.model_copy(update={"model": resolve_model(run.model, spec)})  # model.name left out: the default
    param_count = _check_model(run, spec)
    weights = None
    if manifest.task == "classification":
        weights = class_weights(run.train.loss, manifest.classes, manifest.splits["train"].get("class_counts"))
    resources = plan_resources(run.scaling, cluster_resources or ray.cluster_resources())
    world_size = run.scaling.num_workers
    train_rows = manifest.splits["train"]["rows"]
    if train_rows // world_size < run.train.batch_size:
        raise UserError(
            f"train.batch_size: {run.train.batch_size} is larger than each worker's shard of the "
            f"training split ({train_rows} rows / {world_size} workers = {train_rows // world_size})"
        )
    for split in ("validation", "test"):
        rows = manifest.splits[split]["rows"]
        if rows < world_size:
            raise UserError(
                f"scaling.num_workers: the {split} split has {rows} rows, fewer than the "
                f"{world_size} workers that score it; use fewer workers or prepare a larger {split} split"
            )
    metric = run.train.metric or m.default_metric(manifest.task)
    if metric not in m.metric_names(manifest.task):
        raise UserError(
            f"train.metric: {metric!r} is not reported for {manifest.task}; "
            f"choose one of {', '.join(m.metric_names(manifest.task))}"
        )
    return CheckedRun(run, manifest, spec, param_count, weights, resources, metric,
                      optimizer_steps(train_rows, world_size, run.train))


@dataclass
class OpenedRun:
    """The run directory, checked for a resume and with this attempt's records written."""

    storage: RunDir
    notices: list[str]
    resume_epoch: int
    """The epoch the workers start at (0: a new run)."""
    deepspeed: dict[str, Any]
    """The DeepSpeed config the workers get, exactly as written to the run directory."""
    target_scale: Any
    trackers: list


def open_run_dir(checked: CheckedRun) -> OpenedRun:
    """Locate the run's directory (local, or S3 with a local staging copy), check a resume
    against it, and write its config, DeepSpeed and dataset records."""
    run, manifest, spec = checked.run, checked.manifest, checked.spec
    storage = locate(run.storage, run.name, run.data.s3)
    run_dir = storage.local
    if storage.remote:
        storage.check_bucket()
        storage.pull_records()  # a resumed run continues its own records
        resume_epoch = _resume_epoch_on_s3(storage)
        steps_done = None  # the workers convert S3 checkpoints in memory; the schedule is not rescaled
        notices: list[str] = []
        _check_same_input(run_dir, spec, manifest, has_checkpoints=resume_epoch > 0)
    else:
        _check_same_input(run_dir, spec, manifest, has_checkpoints=any(run_dir.glob("checkpoint_*")))
        # Resuming from another run's checkpoint is allowed: population-based training seeds a
        # trial's new run with a copy of a donor's (stoker.tune.checkpoints.seed_run).
        notices, resume_epoch, steps_done = _check_checkpoints(run_dir, run, spec)
    records = storage.records
    trackers: list = [TensorBoardLog(records.tensorboard)]
    run_dir.mkdir(parents=True, exist_ok=True)
    if run.train.tracking.mlflow:
        trackers.append(MlflowLog(run_dir, run.train.tracking.mlflow_uri, run.name,
                                  flatten("", run.model_dump(mode="json", include={"model", "train", "scaling"}))))
    records.write_config(run.model_dump(mode="json"))
    target_scale = training_target_scale(run.data.output, manifest, run.data.s3)
    # Computed once: the workers get exactly what is written here.
    ds_config = deepspeed_config(run.train, run.scaling.num_workers, checked.steps, checked.param_count)
    _continue_schedule(ds_config, steps_done, resume_epoch, run.train.epochs, checked.steps)
    records.write_deepspeed(ds_config)
    records.write_dataset({
        "path": run.data.output if is_s3(run.data.output) else str(Path(run.data.output).resolve()),
        "source_fingerprint": manifest.source_fingerprint,
        "rows": {s: manifest.splits[s]["rows"] for s in SPLITS},
        "input_shape": list(spec.input_shape),
        "num_classes": manifest.num_classes,
        "target_scale": asdict(target_scale) if target_scale else None,
    })
    return OpenedRun(storage, notices, resume_epoch, ds_config, target_scale, trackers)


@dataclass
class RunPlan:
    """Everything the run's workers and Ray need, before any Ray Train object exists: what
    `build_trainer` hands to a TorchTrainer, and what an in-process trial runs directly
    (stoker.tune.inprocess)."""

    checked: CheckedRun
    opened: OpenedRun
    worker: WorkerPlan
    datasets: dict[str, ray.data.Dataset]
    log: RunLog
    data_config: DataConfig
    checkpoint_config: CheckpointConfig


def plan_run(run: RunSpec, cluster_resources: dict | None = None, train_cache: ray.data.Dataset | None = None,
             score_test: bool = True, stop_flag: str | None = None) -> RunPlan:
    """Check the run (`check_run`), open its directory (`open_run_dir`) and plan its workers
    and data: each step once."""
    checked = check_run(run, cluster_resources)
    opened = open_run_dir(checked)
    run, manifest = checked.run, checked.manifest
    # Ray Data's progress bars and plan printouts drown the epoch lines on a terminal.
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    read_options, iter_options = _ingest_options(run, manifest)
    if cluster_resources is None:
        nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    else:
        nodes = [cluster_resources.get("CPU", 0.0)]
    streams = can_stream(checked.resources, run.scaling.num_workers, nodes)
    # A resumed run's training pass at epoch k is shuffled as epoch k of an uninterrupted run.
    # `epochs` is the run's, not what is left after a resume: whether the training split is
    # cached decides how its epochs are ordered, so a resumed run must decide as the first did.
    # Only the training split goes through Ray Data; each rank reads the (small) evaluation
    # splits itself (stoker.trainer.eval_rows).
    datasets = {"train": read_split(run.data.output, "train", checked.resources.read_task_cpus,
                                    first_epoch=opened.resume_epoch, epochs=run.train.epochs, can_stream=streams,
                                    cached=train_cache, **read_options)}
    worker = WorkerPlan(
        run_name=run.name, train=run.train, model=run.model, spec=checked.spec, features=list(manifest.features),
        num_classes=manifest.num_classes, metric=checked.metric, deepspeed=opened.deepspeed,
        eval_rows={split: manifest.splits[split]["rows"] for split in ("validation", "test")},
        eval_files={split: split_files(run.data.output, split, manifest, run.data.s3) for split in ("validation", "test")},
        class_weights=checked.class_weights, ingest=iter_options, target_scale=opened.target_scale,
        score_test=score_test, stop_flag=stop_flag, train_rows=manifest.splits["train"]["rows"],
    )
    log = RunLog(opened.storage.records, opened.trackers, max_failures=run.train.max_failures,
                 checkpoint_epoch=opened.resume_epoch - 1 if opened.resume_epoch else None)
    # Deterministic sharding: with preserve_order Ray hands blocks to ranks in a fixed order
    # instead of by arrival/locality, so the same seed sees the same rows per rank
    # (reproducibility, and a restarted epoch equal to an uninterrupted one). Only the
    # training split is split by Ray (equal shards, the remainder dropped): every rank reads
    # the evaluation splits whole and scores its own share of every row (stoker.trainer.eval_rows).
    data_config = DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True))
    # Ranked by the loop's own definition of best (stoker.trainer.ranking): the best epoch's
    # checkpoint ranks strictly first, so Ray never evicts it.
    checkpoint_config = CheckpointConfig(num_to_keep=run.train.checkpoint.keep,
                                         checkpoint_score_attribute=CHECKPOINT_RANK, checkpoint_score_order="max")
    return RunPlan(checked, opened, worker, datasets, log, data_config, checkpoint_config)


def build_trainer(run: RunSpec, callbacks: list | None = None, cluster_resources: dict | None = None,
                  train_cache: ray.data.Dataset | None = None, score_test: bool = True,
                  stop_flag: str | None = None) -> PreparedRun:
    """Check a validated run (the CLI's `RunConfig` is one) against its dataset and the cluster, write the
    run directory's records, and build (not start) its TorchTrainer (`plan_run`, then Ray's objects).

    The trainer's Ray run is `<storage>/<name>`, so building it again with the same name
    resumes from the latest checkpoint. Tune trials pass their own `callbacks` (e.g.
    `TuneReportCallback`) and a per-trial name/storage through `run`, and the training split
    a search read once for all its trials (`train_cache`, from `datasets.ingest.cache_split`),
    and leave the test split alone (`score_test=False`, see `WorkerPlan.score_test`).
    """
    set_train_poll_interval()  # read by TorchTrainer.fit(): reports collected every 0.1 s, not 2 s
    set_train_collective_timeout(run.train.collective_timeout_s)  # also read by fit(): the report barrier
    plan = plan_run(run, cluster_resources, train_cache, score_test, stop_flag)
    run, storage = plan.checked.run, plan.opened.storage
    resources = {"CPU": plan.checked.resources.cpus_per_worker}
    if plan.checked.resources.gpus_per_worker:
        resources["GPU"] = plan.checked.resources.gpus_per_worker
    # Local storage: the run directory's parent. S3: `bucket/prefix` and a pyarrow S3
    # filesystem, so Ray Train writes (and on resume finds) the checkpoints on S3 itself.
    storage_path, storage_filesystem = storage.ray_storage()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        # Bounds the world process group's collectives (stoker.trainer.hangs bounds the rest).
        torch_config=TorchConfig(timeout_s=run.train.collective_timeout_s),
        train_loop_config={"plan": plan.worker},
        scaling_config=RayScalingConfig(
            # Elastic (`num_workers: [min, max]`): Ray Train starts once `min` workers fit, and
            # restarts the group at another size as nodes come and go; each restart resumes
            # from the latest checkpoint at the new size (stoker.trainer.checkpoint_resize).
            num_workers=(run.scaling.min_workers, run.scaling.num_workers) if run.scaling.elastic
            else run.scaling.num_workers,
            use_gpu=run.scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=run.scaling.placement_strategy,
            **({"elastic_resize_monitor_interval_s": run.scaling.grow_check_s} if run.scaling.elastic else {}),
        ),
        run_config=RayRunConfig(
            name=run.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=plan.checkpoint_config,
            # A node drain is a preemption, retried without limit and apart from
            # train.max_failures (stoker.trainer.preemption).
            failure_config=FailureConfig(max_failures=run.train.max_failures, max_preemption_failures=-1),
            callbacks=[plan.log, *(callbacks or [])],
        ),
        datasets=plan.datasets,
        dataset_config=plan.data_config,
    )
    return PreparedRun(trainer, storage.local, plan.checked.metric, plan.checked.manifest, plan.checked.spec,
                       plan.opened.notices, plan.log, storage)


def _say_event(event: dict[str, Any]) -> None:
    """One line for a worker failure, instead of Ray's raw `(raylet) A worker died...`, and
    one for a node drain's checkpoint."""
    if event["event"] == "stopped":
        print(f"stoker: stopping: checkpointed epoch {event['epoch']} at micro-step {event['micro_step']} of "
              f"{event['steps_in_epoch']}", file=sys.stderr, flush=True)
        return
    if event["event"] == "preempted":
        deadline = event.get("deadline_ms")
        when = f"deadline in {max(deadline / 1000 - time.time(), 0):.0f} s" if deadline else "no deadline given"
        nodes = ", ".join(node[:12] for node in event["nodes"])
        print(f"stoker: node {nodes} (ranks {', '.join(map(str, event['ranks']))}) is being drained, {when}: "
              f"checkpointed epoch {event['epoch']} at micro-step {event['micro_step']} of "
              f"{event['steps_in_epoch']}; the run resumes from there on the nodes that remain "
              "(a preemption: not counted in train.max_failures)", file=sys.stderr, flush=True)
        return
    if event["event"] == "straggler":  # stoker.trainer.stragglers, from rank 0 at the epoch's end
        print(f"stoker: {event['line']}", file=sys.stderr, flush=True)
        return
    ranks = ", ".join(str(r) for r in event["ranks"])
    died = f"stoker: worker rank {ranks} failed ({event['cause']})"
    limit = event["max_failures"]
    if limit >= 0 and event["attempt"] > limit:
        print(f"{died}; no restarts left (train.max_failures {limit})", file=sys.stderr, flush=True)
        return
    where = (f"epoch {event['resume_epoch']}'s checkpoint" if event["resume_epoch"] is not None
             else "the start (no checkpoint yet)")
    of = "unlimited" if limit < 0 else f"{limit}"
    print(f"{died}; restarting the workers from {where}, attempt {event['attempt']} of {of} "
          "(train.max_failures)", file=sys.stderr, flush=True)


def _fit_interruptibly(trainer: TorchTrainer, stop_flag=None):
    """`trainer.fit()` in a helper thread, so that Ctrl-C (and SIGTERM where the caller turns it
    into one) raises KeyboardInterrupt here, in the caller's thread. Called from the main
    thread, fit() would install Ray's own SIGINT handler, which aborts the run and leaves the
    process with exit code 0 or 1 and no word about resuming.

    On the interrupt, with a `stop_flag`, the workers first checkpoint where they are (up to
    `STOP_WAIT_S`; a second interrupt stops at once): the caller's `ray.shutdown()` would end
    the run's controller, which this driver owns, and the work since the last epoch with it."""
    outcome: dict[str, Any] = {}
    done = threading.Event()  # not Thread.is_alive(): a join cut short by a signal marks the thread ended

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=fit, name="stoker-fit", daemon=True).start()
    try:
        while not done.wait(0.2):  # short waits: the main thread must stay able to take a signal
            pass
    except KeyboardInterrupt:
        if stop_flag is not None and not done.is_set() and ray.get(stop_flag.raise_.remote()):
            print("stoker: stopping: the workers save a checkpoint first (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
            deadline = time.monotonic() + STOP_WAIT_S
            while not done.is_set() and time.monotonic() < deadline:
                time.sleep(0.2)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def train(
    run: RunSpec,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train the run described by a validated `RunSpec` (the CLI's `RunConfig` is one) on the connected cluster.

    `progress` is called with each epoch's metrics as the epoch finishes; `on_start` with the
    run directory once every check has passed and just before training starts, so a refused
    run leaves no trace.
    """
    # Ctrl-C and SIGTERM reach the main thread only: there, the workers are told to checkpoint
    # before a stop, through an actor named per driver that their rank 0 finds.
    flag_name = f"stoker-stop-{uuid.uuid4().hex}" if threading.current_thread() is threading.main_thread() else None
    # On the driver's node when it can be (a cluster's head is the node least likely drained);
    # elsewhere, and again after a node loss, through its restarts (stoker.trainer.stop_flag).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    flag = StopFlag.options(name=flag_name, scheduling_strategy=here).remote() if flag_name else None
    try:
        prepared = build_trainer(run, stop_flag=flag_name)
        prepared.stop_flag = flag
        try:
            return _train(run, prepared, progress, on_start)
        finally:
            # S3 storage: the records go up whatever happened (finished, failed or stopped), so a
            # resume elsewhere finds them next to the checkpoints Ray Train wrote.
            if prepared.storage is not None:
                prepared.storage.push_records()
    finally:
        if flag is not None and ray.is_initialized():
            ray.kill(flag)


def _train(run: RunSpec, prepared: PreparedRun, progress, on_start) -> TrainResult:
    run_dir, metric = prepared.run_dir, prepared.metric
    records = Records(run_dir)
    if on_start is not None:
        on_start(run_dir)
    for notice in prepared.notices:
        print(f"stoker: warning: {notice}", file=sys.stderr, flush=True)
    stop = threading.Event()
    followers = [
        threading.Thread(target=follow, args=(records.metrics_path, progress or (lambda _: None), stop), daemon=True),
        threading.Thread(target=follow, args=(records.events_path, _say_event, stop), daemon=True),
    ]
    for follower in followers:
        follower.start()
    try:
        result = _fit_interruptibly(prepared.trainer, prepared.stop_flag)
    finally:
        stop.set()
        for follower in followers:
            follower.join()
        if prepared.log is not None:
            prepared.log.close()
    returned = result.return_value
    if returned.get("error"):
        # NaN loss: a property of the config and data, so not retried; the last good
        # checkpoint stays.
        raise UserError(returned["error"])
    best, history = returned["best"], returned["history"]
    # Local or S3 alike (RunDir.checkpoints); a drain's mid-epoch checkpoint is never the best's.
    best_checkpoint = next((name for name, epoch in prepared.storage.checkpoints(whole_epochs=True)
                            if epoch == best["epoch"]), None)
    final: FinalMetrics = {
        "run": run.name,
        "metric": f"val_{metric}",
        "best_rule": f"highest val_{metric}" if m.metric_mode(metric) == "max" else f"lowest val_{metric}",
        "tie_break": "on an equal metric the lower val_loss wins; on equal both the earlier epoch",
        "best_epoch": best["epoch"],
        "checkpoint": best_checkpoint,
        "validation": best["validation"],
        "test": best["test"],
        "test_details": best.get("test_details", {}),
        "epochs_trained": len(history),
        "stopped_early": bool(history and history[-1].get("early_stopped")),
        "source_fingerprint": prepared.manifest.source_fingerprint,
    }
    records.write_final(final)
    from stoker.trainer.report import write_report  # matplotlib: only once training is done

    write_report(run_dir, run.name, metric, history, best, prepared.manifest.classes)
    return TrainResult(run_dir, best["epoch"], metric, best["test"], best["validation"], final["stopped_early"],
                       prepared.storage.uri if prepared.storage is not None else str(run_dir))


__all__ = ["PreparedRun", "TrainResult", "build_model", "build_trainer", "train"]
