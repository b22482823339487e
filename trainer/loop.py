"""The function every Ray Train worker runs: build, (resume), train, validate, report.

Sync points are marked: `ray.train.report` is a barrier (every rank calls it once per epoch),
DeepSpeed's backward/step all-reduce gradients, metric `compute()` all-gathers, and the
NaN check and epoch decisions are small collectives at fixed steps. Every rank reaches
each of them the same number of times because Ray splits the data equally.
"""

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from stoker.datasets.ingest import WaitClock, iter_split, start_split
from stoker.trainer import checkpoints as ckpt
from stoker.trainer import metrics as m
from stoker.trainer.config import ModelConfig, TrainConfig
from stoker.trainer.deepspeed_config import deepspeed_config
from stoker.trainer.deepspeed_engine import build_engine
from stoker.trainer.eval_rows import EvalRows
from stoker.trainer.hyperparams import apply_optimizer_config, optimizer_record
from stoker.trainer.losses import build_loss, penalty
from stoker.trainer.models import InputSpec
from stoker.trainer.ranking import CHECKPOINT_RANK, Patience, Score, better, checkpoint_rank
from stoker.trainer.schedule import stoker_schedule

# Optimizer-independent cadence of the cross-rank NaN check: one 8-byte all-reduce every
# this many micro-steps (and at each epoch's end) instead of a host sync on every step.
NAN_CHECK_EVERY = 50
_NO_BAD_STEP = 2**62


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_loop_per_worker(cfg: dict[str, Any]) -> dict[str, Any] | None:
    train = TrainConfig.model_validate(cfg["train"])
    spec = InputSpec(**{**cfg["spec"], "input_shape": tuple(cfg["spec"]["input_shape"])})
    task, features, num_classes = spec.task, cfg["features"], cfg["num_classes"]
    metric, mode = cfg["metric"], m.metric_mode(cfg["metric"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    # The first training pass starts now, in the background: the split coordinator's start-up
    # and the first blocks arrive while DeepSpeed initialises, not inside epoch 0.
    start_split(ray.train.get_dataset_shard("train"), features, **cfg.get("ingest", {}))
    dtype = torch.bfloat16 if train.deepspeed.bf16 else torch.float16 if train.deepspeed.fp16 else torch.float32
    # The evaluation splits are read once, whole, into memory (each rank keeps its share of
    # every row), also in the background: no Ray Data execution at each validation.
    eval_rows = {
        split: EvalRows(ray.train.get_dataset_shard(split), features, cfg["eval_rows"][split], rank, world_size,
                        dtype, cfg.get("ingest", {})).start()
        for split in ("validation", "test")
    }
    seed_everything(train.seed)  # same seed on every rank: identical initial weights
    engine, optimizer, scheduler = build_engine(
        ModelConfig.model_validate(cfg["model"]), spec,
        deepspeed_config(train, world_size, cfg["steps_per_epoch"], cfg.get("param_count")),
    )
    # Different dropout masks per rank, still a pure function of the seed.
    seed_everything(train.seed * 1009 + rank + 1)
    loss_fn = build_loss(train.loss, task, cfg.get("class_weights"), engine.device)
    lr_schedule = stoker_schedule(train.schedule, train.optimizer.lr, mode)
    # Built at the first evaluation: importing torchmetrics takes most of a second, which
    # would otherwise delay the first training step.
    evaluation: m.Evaluation | None = None

    start_epoch, best, history = 0, None, []
    resume_changes: list[str] = []
    stopping = Patience(train.early_stopping.patience, mode, train.early_stopping.min_delta)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = _resume(engine, Path(directory), Path(checkpoint.path), rank)
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        if best is not None:  # a checkpoint written before the loss tie-break and the rank
            best.setdefault("loss", best["validation"].get("loss", float("inf")))
            best.setdefault("rank", 1.0)
        stopping.load_state_dict(state.get("stopping") or {})
        # PBT (or a user) may resume with other optimizer settings than the checkpoint's.
        resume_changes = apply_optimizer_config(optimizer, scheduler, train.optimizer, state.get("optimizer"))
        if resume_changes and rank == 0:
            print(f"stoker: resuming epoch {start_epoch} with the config's optimizer settings instead of "
                  f"the checkpoint's: {'; '.join(resume_changes)}", flush=True)
        if lr_schedule and state.get("schedule"):
            lr_schedule.load_state_dict(state["schedule"])
        if state.get("stopped"):
            start_epoch = train.epochs  # early-stopped run: nothing left to train

    def batches(epoch: int):
        # The shuffle seed is (seed, epoch, rank) itself, not a sum that two runs could share:
        # a resumed epoch sees the same order as an uninterrupted one.
        shard = ray.train.get_dataset_shard("train")
        for batch in iter_split(shard, features, train.batch_size, engine.device, dtype, (train.seed, epoch, rank),
                                **cfg.get("ingest", {})):
            x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
            yield x, (x if task == "language_modeling" else y)

    def evaluate(split: str, details: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
        nonlocal evaluation
        if evaluation is None:
            evaluation = m.Evaluation(task, num_classes, engine.device)
        engine.eval()
        evaluation.reset(with_details=details)
        with torch.no_grad():
            for x, y, valid in eval_rows[split].batches(train.batch_size, engine.device):
                out = engine(x)  # every rank, also on a padding batch: ZeRO-3's forward is a collective
                if valid:
                    y = x if task == "language_modeling" else y
                    evaluation.update(out[:valid], y[:valid], loss_fn(out[:valid], y[:valid]), x[:valid])
        engine.train()
        return evaluation.compute()  # sync: all-reduce + all-gather

    error = None
    for epoch in range(start_epoch, train.epochs):
        engine.train()
        started, micro_steps = time.perf_counter(), 0
        loss_total = torch.zeros((), device=engine.device)
        first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.long, device=engine.device)
        step_validations: list[dict[str, Any]] = []
        last_validated = engine.global_steps
        clock = WaitClock()
        for x, y in clock.iterate(batches(epoch)):
            if lr_schedule:
                lr_schedule.apply(optimizer, engine.global_steps)
            out = engine(x)
            loss = loss_fn(out, y)
            extra = penalty(train.loss, engine.module.parameters())
            if extra is not None:
                loss = loss + extra
            engine.backward(loss)  # sync: gradient all-reduce / reduce-scatter
            engine.step()
            detached = loss.detach().float()
            loss_total += detached  # no .item(): no per-step host sync
            first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(detached), _NO_BAD_STEP, micro_steps))
            micro_steps += 1
            if micro_steps % NAN_CHECK_EVERY == 0 and _bad_step(first_bad) is not None:
                break
            steps = engine.global_steps
            if train.validate_every_steps and steps != last_validated and steps % train.validate_every_steps == 0:
                last_validated = steps
                scores, _ = evaluate("validation")
                step_validations.append({"step": steps, **{f"val_{k}": v for k, v in scores.items()}})
        epoch_time = time.perf_counter() - started
        bad = _bad_step(first_bad)  # sync: the same all-reduce on every rank
        if bad is not None:
            last_good = f"epoch {epoch - 1}" if epoch > 0 else "none: it failed in the first epoch"
            error = (
                f"train: the loss became NaN/inf at epoch {epoch}, step {bad} of the epoch; training "
                f"stopped and the last good checkpoint is kept ({last_good}); lower "
                f"train.optimizer.lr or set train.deepspeed.gradient_clipping"
            )
            break

        validation, _ = evaluate("validation")
        score = Score(validation[metric], validation["loss"])
        improved = better(score, Score(best["score"], best["loss"]) if best else None, mode)
        stopping.update(score)
        # Sync: rank 0's decisions win, so a last-bit difference in a metric can never send
        # ranks down different paths (test evaluation and the next epoch are collectives).
        improved, stop = _agree(engine.device, improved, stopping.exhausted)
        if improved:
            # The test split is scored at the epoch validation picks, so the best checkpoint's
            # test metrics need no reload at the end.
            test, details = evaluate("test", details=True)
            best = {"epoch": epoch, "score": score.metric, "loss": score.loss, "validation": validation,
                    "test": test, "test_details": details,
                    "rank": checkpoint_rank(best["rank"] if best else None, True)}
        if lr_schedule:
            lr_schedule.end_epoch(epoch, score.metric)
        record = {
            "epoch": epoch,
            "train_loss": float(loss_total) / max(micro_steps, 1),
            "epoch_time_s": epoch_time,
            "samples_per_s": micro_steps * train.batch_size * world_size / epoch_time if epoch_time else 0.0,
            "data_wait_fraction": clock.fraction(),
            "first_batch_s": clock.first_batch_s,
            "lr": float(engine.get_lr()[0]) if engine.get_lr() else train.optimizer.lr,
            **{f"val_{k}": v for k, v in validation.items()},
            f"best_val_{metric}": best["score"],
            "best_epoch": best["epoch"],
            "global_step": engine.global_steps,
            CHECKPOINT_RANK: best["rank"] if improved else checkpoint_rank(best["rank"], False),
        }
        if step_validations:
            record["step_validations"] = step_validations
        if resume_changes:
            record["resume_changes"], resume_changes = resume_changes, []
        if stop:
            record["early_stopped"] = True
        history.append({k: v for k, v in record.items() if k not in ("step_validations", "resume_changes")})
        # The best epoch always gets a checkpoint (export and the registry take it), and so does
        # the last one (resume); the others every `checkpoint.every` epochs.
        last = stop or epoch == train.epochs - 1
        if improved or last or (epoch + 1) % train.checkpoint.every == 0:
            state = {
                "epoch": epoch, "best": best, "history": history, "stopping": stopping.state_dict(), "stopped": stop,
                "schedule": lr_schedule.state_dict() if lr_schedule else None,
                "optimizer": optimizer_record(train.optimizer),
            } if rank == 0 else None
            _save_and_report(engine, rank, record, state)
        else:
            ray.train.report(record)  # sync: a barrier, as with a checkpoint
        if stop:
            break

    if rank == 0:
        result: dict[str, Any] = {"best": best, "history": history}
        if error:
            result["error"] = error
        return result
    return None


def _save_and_report(engine, rank: int, record: dict[str, Any], state: dict[str, Any] | None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=ckpt.CHECKPOINT_TAG)  # every rank writes its shard
        ckpt.finish(Path(directory), rank, state)
        # Sync: report is a barrier; Ray merges every rank's files into one checkpoint.
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _bad_step(first_bad: torch.Tensor) -> int | None:
    """The earliest non-finite micro-step of this epoch on any rank, or None (a collective)."""
    value = first_bad.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    step = int(value)
    return None if step >= _NO_BAD_STEP else step


def _agree(device: torch.device, *flags: bool) -> list[bool]:
    decision = torch.tensor([float(f) for f in flags], device=device)
    dist.broadcast(decision, src=0)
    return [bool(v) for v in decision.tolist()]


def _resume(engine, directory: Path, stored_at: Path, rank: int) -> dict[str, Any]:
    """Load the latest checkpoint, or the newest intact earlier one if it fails its checksums."""
    problem = ckpt.verify(directory)
    if problem is not None:
        # Local/shared storage only: the sibling checkpoints are directories next to it.
        for candidate in ckpt.local_checkpoints(stored_at.parent):
            if candidate.resolve() != stored_at.resolve() and ckpt.verify(candidate) is None:
                if rank == 0:
                    print(f"stoker: checkpoint {stored_at.name} is corrupt ({problem}); "
                          f"resuming from {candidate.name}", flush=True)
                directory = candidate
                break
        else:
            raise RuntimeError(f"checkpoint {stored_at.name} is corrupt ({problem}) and no earlier one is intact")
    engine.load_checkpoint(str(directory), tag=ckpt.CHECKPOINT_TAG)
    ckpt.restore_rng(directory, rank)
    return ckpt.read_state(directory)
