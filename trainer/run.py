"""The driver side of a training run: check, size, launch the TorchTrainer, write the run dir.

The run directory `<storage>/<name>` holds Ray Train's checkpoints plus stoker's records:
config.yaml (resolved), dataset.json (manifest fingerprint), deepspeed_config.json,
metrics.jsonl (one line per epoch, written as epochs finish) and final_metrics.json.
"""

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import yaml
from ray.train import CheckpointConfig, FailureConfig
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchTrainer

from stoker.datasets.ingest import read_split
from stoker.datasets.manifest import SPLITS, Manifest
from stoker.errors import UserError
from stoker.trainer import metrics as m
from stoker.trainer.engine import deepspeed_config, optimizer_steps
from stoker.trainer.loop import train_loop_per_worker
from stoker.trainer.resources import plan_resources


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    metric: str
    test: dict[str, float]
    validation: dict[str, float]


class MetricsLog(ray.train.UserCallback):
    """Appends each epoch's rank-0 metrics to metrics.jsonl as soon as the epoch is reported."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        record = dict(metrics[0])
        if checkpoint is not None:
            record["checkpoint"] = checkpoint.path
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    tmp.replace(path)


def follow(path: Path, emit: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    """Call `emit` with each new line of a JSONL file until `stop` is set (then drain it)."""
    offset = path.stat().st_size if path.exists() else 0
    while True:
        stopping = stop.wait(0.5)
        if path.exists():
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


def build_trainer(run, callbacks: list | None = None, cluster_resources: dict | None = None) -> PreparedRun:
    """Check a validated `stoker.config.RunConfig` against its dataset and the cluster, write the
    run directory's records, and build (not start) its TorchTrainer.

    The trainer's Ray run is `<storage>/<name>`, so building it again with the same name
    resumes from the latest checkpoint. Tune trials pass their own `callbacks` (e.g.
    `TuneReportCallback`) and a per-trial name/storage through `run`.
    """
    manifest = Manifest.read(run.data.output)
    if manifest.task != run.data.task:
        raise UserError(
            f"data.task: {run.data.task} but the dataset at {run.data.output} was prepared for "
            f"{manifest.task}; prepare it again"
        )
    plan = plan_resources(run.scaling, cluster_resources or ray.cluster_resources())
    world_size = run.scaling.num_workers
    train_rows = manifest.splits["train"]["rows"]
    if train_rows // world_size < run.train.batch_size:
        raise UserError(
            f"train.batch_size: {run.train.batch_size} is larger than each worker's shard of the "
            f"training split ({train_rows} rows / {world_size} workers = {train_rows // world_size})"
        )
    metric = run.train.metric or m.default_metric(manifest.task)
    if metric not in m.metric_names(manifest.task):
        raise UserError(
            f"train.metric: {metric!r} is not reported for {manifest.task}; "
            f"choose one of {', '.join(m.metric_names(manifest.task))}"
        )
    steps = optimizer_steps(train_rows, world_size, run.train)

    run_dir = (Path(run.storage) / run.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False))
    write_json_atomic(run_dir / "deepspeed_config.json", deepspeed_config(run.train, world_size, steps))
    write_json_atomic(run_dir / "dataset.json", {
        "path": str(Path(run.data.output).resolve()),
        "source_fingerprint": manifest.source_fingerprint,
        "rows": {s: manifest.splits[s]["rows"] for s in SPLITS},
    })

    # Ray Data's progress bars and plan printouts drown the epoch lines on a terminal.
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    datasets = {split: read_split(run.data.output, split, plan.read_task_cpus) for split in SPLITS}
    resources = {"CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        resources["GPU"] = plan.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": run.train.model_dump(mode="json"),
            "model": run.model.model_dump(mode="json"),
            "task": manifest.task,
            "features": manifest.features,
            "num_classes": manifest.num_classes,
            "metric": metric,
            "steps_per_epoch": steps,
        },
        scaling_config=RayScalingConfig(
            num_workers=world_size, use_gpu=run.scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=run.scaling.placement_strategy,
        ),
        run_config=RayRunConfig(
            name=run.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=f"val_{metric}",
                checkpoint_score_order=m.metric_mode(metric),
            ),
            failure_config=FailureConfig(max_failures=0),
            callbacks=[MetricsLog(str(run_dir / "metrics.jsonl")), *(callbacks or [])],
        ),
        datasets=datasets,
    )
    return PreparedRun(trainer, run_dir, metric, manifest)


def train(run, progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train the run described by a validated `stoker.config.RunConfig` on the connected cluster.

    `progress` is called with each epoch's metrics as the epoch finishes.
    """
    prepared = build_trainer(run)
    run_dir, metric = prepared.run_dir, prepared.metric
    stop = threading.Event()
    follower = threading.Thread(
        target=follow, args=(run_dir / "metrics.jsonl", progress or (lambda _: None), stop), daemon=True
    )
    follower.start()
    try:
        result = prepared.trainer.fit()
    finally:
        stop.set()
        follower.join()
    best = result.return_value["best"]
    final = {
        "run": run.name,
        "metric": f"val_{metric}",
        "best_epoch": best["epoch"],
        "validation": best["validation"],
        "test": best["test"],
        "source_fingerprint": prepared.manifest.source_fingerprint,
    }
    write_json_atomic(run_dir / "final_metrics.json", final)
    return TrainResult(run_dir, best["epoch"], metric, best["test"], best["validation"])
