"""The function every Ray Train worker runs: build, (resume), train, validate, report.

Sync points are marked: `ray.train.report` is a barrier (every rank calls it once per epoch),
DeepSpeed's backward/step all-reduce gradients, and metric `compute()` all-gathers.
"""

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import torch
from torch import nn

from stoker.datasets.ingest import WaitClock, iter_split
from stoker.trainer import metrics as m
from stoker.trainer.config import ModelConfig, TrainConfig
from stoker.trainer.engine import deepspeed_config
from stoker.trainer.models import build_model

CHECKPOINT_TAG = "ds"
STATE_FILE = "stoker_state.json"


def train_loop_per_worker(cfg: dict[str, Any]) -> dict[str, Any] | None:
    train = TrainConfig.model_validate(cfg["train"])
    task, features, num_classes = cfg["task"], cfg["features"], cfg["num_classes"]
    metric, mode = cfg["metric"], m.metric_mode(cfg["metric"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    torch.manual_seed(train.seed)  # same seed on every rank: identical initial weights
    model = build_model(ModelConfig.model_validate(cfg["model"]), len(features), num_classes or 1)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(train, world_size, cfg["steps_per_epoch"]),
    )
    dtype = torch.bfloat16 if train.deepspeed.bf16 else torch.float16 if train.deepspeed.fp16 else torch.float32
    loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    evaluation = m.build_metrics(task, num_classes, engine.device)

    start_epoch, best, history = 0, None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
            state = json.loads((Path(directory) / STATE_FILE).read_text())
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]

    def batches(split: str, shuffle: bool, epoch: int):
        seed = train.seed + epoch * 1000 + rank if shuffle else None
        return iter_split(ray.train.get_dataset_shard(split), features, train.batch_size, engine.device, dtype, seed)

    def evaluate(split: str) -> dict[str, float]:
        engine.eval()
        evaluation.reset()
        loss_sum = torch.zeros(2, device=engine.device, dtype=torch.float64)
        with torch.no_grad():
            for x, y in batches(split, False, 0):
                out = engine(x)
                loss_sum += torch.stack([loss_fn(_for_loss(out, task), y).double() * len(y), torch.tensor(len(y), dtype=torch.float64)])
                m.update(evaluation, task, out, y)
        # Sync: all-reduce the loss sums and all-gather metric states across ranks.
        torch.distributed.all_reduce(loss_sum)
        results = {k: float(v) for k, v in evaluation.compute().items()}
        results["loss"] = float(loss_sum[0] / loss_sum[1])
        return results

    for epoch in range(start_epoch, train.epochs):
        engine.train()
        started, steps, loss_total = time.perf_counter(), 0, torch.zeros((), device=engine.device)
        clock = WaitClock()
        for x, y in clock.iterate(batches("train", True, epoch)):
            loss = loss_fn(_for_loss(engine(x), task), y)
            engine.backward(loss)  # sync: gradient all-reduce / reduce-scatter
            engine.step()
            loss_total += loss.detach().float()  # detach, not .item(): no per-step host sync
            steps += 1
        epoch_time = time.perf_counter() - started

        validation = evaluate("validation")
        score = validation[metric]
        improved = best is None or (score > best["score"] if mode == "max" else score < best["score"])
        if improved:
            # The test split is scored at the epoch that validation picks, which is the best
            # checkpoint's test score without reloading it at the end.
            best = {"epoch": epoch, "score": score, "validation": validation, "test": evaluate("test")}
        record = {
            "epoch": epoch,
            "train_loss": float(loss_total) / max(steps, 1),
            "epoch_time_s": epoch_time,
            "samples_per_s": steps * train.batch_size * world_size / epoch_time if epoch_time else 0.0,
            "data_wait_fraction": clock.fraction(),
            "first_batch_s": clock.first_batch_s,
            "lr": float(scheduler.get_last_lr()[0]) if scheduler else train.optimizer.lr,
            **{f"val_{k}": v for k, v in validation.items()},
            f"best_val_{metric}": best["score"],
            "best_epoch": best["epoch"],
        }
        history.append(record)
        with tempfile.TemporaryDirectory() as directory:
            engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)  # every rank writes its shard
            if rank == 0:
                state = {"epoch": epoch, "best": best, "history": history}
                (Path(directory) / STATE_FILE).write_text(json.dumps(state))
            # Sync: report is a barrier; Ray merges every rank's files into one checkpoint.
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory))

    if rank == 0:
        return {"best": best, "history": history}
    return None


def _for_loss(outputs: torch.Tensor, task: str) -> torch.Tensor:
    # Loss in float32 even under bf16: small logit differences vanish in 8 mantissa bits.
    return outputs.float() if task == "classification" else outputs.float().squeeze(-1)
