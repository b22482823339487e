"""Single-worker trials in the Tune trial's own process: stoker's worker loop, no nested
TorchTrainer.

A one-worker TorchTrainer inside a trial costs a controller actor, a worker actor, a placement
group and a second copy of torch and DeepSpeed in memory, seconds per trial before the first
batch. Here the trial process runs `train_loop_per_worker` itself, with what Ray Train would
have given it:

- the Train API (`ray.train.get_context`, `get_dataset_shard`, `get_checkpoint`, `report`) is
  served by `InProcessTrain`, a Ray Train V2 `TrainFnUtils` (the hook Ray's own local mode uses;
  like every Ray internal, through `stoker.ray_internals`);
- a one-process gloo group (NCCL on a GPU), so DeepSpeed and the loop's collectives run as for
  any world size;
- the same datasets with the same ingest options (the trainer's DataConfig, unsplit);
- checkpoints persisted into the same run directory by Ray Train's own `CheckpointManager`
  (same names, ranking, `num_to_keep` and snapshot), so a trial resumes, a PBT donor is copied,
  and a later TorchTrainer run of the same name resumes, exactly as for a multi-worker trial;
- every report goes to metrics.jsonl/TensorBoard (the trainer's RunLog) and to Tune with a
  pointer checkpoint, as `TuneReportCallback` plus `forward_train_checkpoints` do.

The trial process then runs the search's next trial (Tune reuses the actor), so everything a
trial sets up is torn down when it ends, stopped by a scheduler included: the Train API hook,
the gloo world and DeepSpeed's handles on it, the run log.
"""

import asyncio
import contextlib
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
from ray import tune
from ray.train import CheckpointConfig

from stoker.environment import patched_environ
from stoker.ray_internals import (
    CheckpointManager,
    LocalTrainContext,
    StorageContext,
    TrainFnUtils,
    TrainingReport,
    resolve_execution_options,
    set_train_fn_utils,
    train_api_in_this_thread,
)
from stoker.trainer.loop import train_loop_per_worker
from stoker.tune.checkpoints import CHECKPOINT_PATH_KEY, report_with_pointer


class InProcessTrain(TrainFnUtils):
    """The Ray Train API of a one-worker run whose rank 0 is this process."""

    def __init__(self, name: str, storage_path: str, checkpoint_config: CheckpointConfig,
                 datasets: dict[str, Any], data_config, on_report) -> None:
        self._context = LocalTrainContext(experiment_name=name, world_size=1, world_rank=0, local_rank=0,
                                          local_world_size=1, node_rank=0)
        self._storage = StorageContext(storage_path=storage_path, experiment_dir_name=name)
        # Loads the run's snapshot when there is one: the latest checkpoint is where it resumes.
        self._checkpoints = CheckpointManager(checkpoint_config, self._storage)
        latest = self._checkpoints.latest_checkpoint_result
        self._resume_from = latest.checkpoint if latest else None
        self._shards = {}
        for split, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            # The trainer's ingest options (preserve_order among them), as DataConfig applies them.
            dataset.context.execution_options = resolve_execution_options(data_config, split)
            self._shards[split] = dataset.iterator()
        self._on_report = on_report

    def report(self, metrics: dict[str, Any], checkpoint=None, checkpoint_dir_name: str | None = None,
               *args, **kwargs) -> None:
        persisted = None
        if checkpoint is not None:
            persisted = self._storage.persist_current_checkpoint(
                checkpoint, checkpoint_dir_name or StorageContext.make_default_checkpoint_dir_name())

            async def register() -> None:
                # The manager notifies waiters through an asyncio task; give it a loop to run on.
                self._checkpoints.register_checkpoint(TrainingReport(persisted, metrics, validation=False))
                await asyncio.sleep(0)

            asyncio.run(register())
        self._on_report(metrics, persisted)

    def get_checkpoint(self):
        return self._resume_from

    def get_all_reported_checkpoints(self, *args, **kwargs) -> list:
        return []

    def get_dataset_shard(self, dataset_info):
        return self._shards[dataset_info.dataset_name]

    def get_context(self) -> LocalTrainContext:
        return self._context

    def get_preemption_info(self):
        return None

    def is_distributed(self) -> bool:
        return False

    def barrier(self) -> None:
        pass

    def broadcast_from_rank_zero(self, data: Any) -> Any:
        return data


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _process_group():
    """A world of one: the environment a Train worker of rank 0 sees, and its process group."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    with patched_environ(env):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=0, world_size=1)
        try:
            yield
        finally:
            _destroy_process_group()


def _destroy_process_group() -> None:
    """End this trial's world so that the next trial of a reused trial process starts a new one.

    DeepSpeed keeps its own handles on the world (a clone of the world group that ZeRO
    all-reduces on, its backend object); destroying the world through DeepSpeed drops those
    too, where destroying it through torch alone would leave the next trial's engine holding a
    group of the dead world.
    """
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def run_in_process(plan, report_to_tune) -> Any:
    """Run a one-worker run's `RunPlan` (stoker.trainer.run.plan_run) in this process, with no
    TorchTrainer; returns rank 0's return value. `report_to_tune(metrics, checkpoint_path)` is
    called after each report."""
    log = plan.log

    def on_report(metrics: dict[str, Any], persisted) -> None:
        log.after_report(None, [metrics], persisted)
        report_to_tune(metrics, persisted.path if persisted is not None else None)

    storage_path, _ = plan.opened.storage.ray_storage()
    api = InProcessTrain(plan.checked.run.name, storage_path, plan.checkpoint_config, plan.datasets,
                         plan.data_config, on_report)
    set_train_fn_utils(api)
    try:
        with train_api_in_this_thread(), _process_group():
            return train_loop_per_worker({"plan": plan.worker})
    finally:
        set_train_fn_utils(None)
        log.close()


def report_in_trial(metrics: dict[str, Any], checkpoint_path: str | None) -> None:
    """Hand one epoch's metrics to the Tune trial, with a pointer checkpoint to the Train one."""
    metrics = dict(metrics)
    if checkpoint_path:
        metrics[CHECKPOINT_PATH_KEY] = checkpoint_path
    report_with_pointer(tune.report, metrics)
