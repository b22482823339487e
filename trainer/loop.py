"""The function every Ray Train worker runs: build, (resume), train, validate, report.

Sync points are marked: `ray.train.report` is a barrier (every rank calls it once per epoch),
DeepSpeed's backward/step all-reduce gradients, metric `compute()` all-gathers, and the
NaN check and epoch decisions are small collectives at fixed steps. Every rank reaches
each of them the same number of times: Ray splits the training data equally, and every rank
runs the same number of evaluation batches (stoker.trainer.eval_rows).
"""

import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from stoker.datasets.ingest import WaitClock, iter_split, start_split
from stoker.trainer import checkpoint_guard
from stoker.trainer import checkpoint_resize as resize
from stoker.trainer import checkpoints as ckpt
from stoker.trainer import metrics as m
from stoker.trainer.deepspeed_config import for_world_size, planned_world_size
from stoker.trainer.deepspeed_engine import build_engine
from stoker.trainer.eval_rows import EvalRows
from stoker.trainer.hangs import rank_name
from stoker.trainer.hyperparams import apply_optimizer_config, optimizer_record
from stoker.trainer.losses import build_loss, penalty
from stoker.trainer.plan import WorkerPlan
from stoker.trainer.preemption import DrainWatch, Partial, StopRequest, wait_for_teardown
from stoker.trainer.ranking import CHECKPOINT_RANK, Patience, Score, better, checkpoint_rank
from stoker.trainer.schedule import stoker_schedule
from stoker.trainer.stragglers import StragglerWatch
from stoker.trainer.timing import StepTimes

# Optimizer-independent cadence of the cross-rank NaN check: one 8-byte all-reduce every
# this many micro-steps (and at each epoch's end) instead of a host sync on every step.
NAN_CHECK_EVERY = 50
_NO_BAD_STEP = 2**62


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    plan: WorkerPlan = config["plan"]
    train, metric, mode = plan.train, plan.metric, m.metric_mode(plan.metric)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    # The first training pass starts now, in the background: the split coordinator's start-up
    # and the first blocks arrive while DeepSpeed initialises, not inside epoch 0. The
    # evaluation splits are read once, whole, into memory, also in the background.
    start_split(ray.train.get_dataset_shard("train"), plan.features, **plan.ingest)
    eval_rows = {split: EvalRows(plan.eval_files[split], plan.features, plan.eval_rows[split], rank,
                                 world_size, _dtype(plan), plan.ingest.get("input_shape")).start()
                 for split in ("validation", "test") if split == "validation" or plan.score_test}
    seed_everything(train.seed)  # same seed on every rank: identical initial weights
    engine, optimizer, scheduler = build_engine(plan.model, plan.spec, for_world_size(plan.deepspeed, world_size))
    seed_everything(train.seed * 1009 + rank + 1)  # different dropout masks per rank
    worker = Worker(plan, engine, rank, world_size, eval_rows)
    run = RunState(Patience(train.early_stopping.patience, mode, train.early_stopping.min_delta),
                   stoker_schedule(train.schedule, train.optimizer.lr, mode))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            run.restore(_resume(engine, Path(directory), Path(checkpoint.path), rank))
        # PBT (or a user) may resume with other optimizer settings than the checkpoint's.
        run.resume_changes = apply_optimizer_config(optimizer, scheduler, train.optimizer, run.saved_optimizer)
        if run.resume_changes and rank == 0:
            print(f"stoker: resuming epoch {run.next_epoch} with the config's optimizer settings instead of "
                  f"the checkpoint's: {'; '.join(run.resume_changes)}", flush=True)
    worker.continue_schedule(scheduler, run)
    drains = DrainWatch(engine.device, rank, plan.stop_flag)

    for epoch in range(run.next_epoch, train.epochs):
        budget = worker.budget(epoch, run.partial)
        trained = worker.run_epoch(epoch, run.schedule, optimizer, drains, budget)
        if trained.drain is not None:
            # A node of the run is being drained: checkpoint here, then let Ray restart the
            # group on the nodes that remain (stoker.trainer.preemption). Or the driver is
            # stopping the run (stoker.trainer.stop_flag): checkpoint here and end.
            worker.save_drained(epoch, trained, budget, run)
            if isinstance(trained.drain, StopRequest):
                break  # the driver is stopping the run; the next `stoker train` resumes from here
            wait_for_teardown()
        if trained.bad_step is not None:
            run.error = _nan_message(epoch, trained.bad_step)
            break
        validated = time.perf_counter()
        validation, _ = worker.evaluate("validation")
        validation_s = time.perf_counter() - validated
        score = Score(validation[metric], validation["loss"])
        improved = better(score, run.best_score, mode)
        run.stopping.update(score)
        # Sync: rank 0's decisions win, so a last-bit difference in a metric can never send
        # ranks down different paths (test evaluation and the next epoch are collectives).
        improved, stop = _agree(engine.device, improved, run.stopping.exhausted)
        if improved:
            # The test split is scored at the epoch validation picks, so the best checkpoint's
            # test metrics need no reload at the end.
            test, details = worker.evaluate("test", details=True) if plan.score_test else ({}, {})
            run.new_best(epoch, score, validation, test, details)
        if run.schedule:
            run.schedule.end_epoch(epoch, score)
        record = worker.record(epoch, trained, validation, run, improved, stop)
        record["validation_s"] = validation_s  # what an epoch costs beyond its pass (`epoch_time_s`)
        run.history.append({k: v for k, v in record.items() if k not in ("step_validations", "resume_changes")})
        # The best epoch always gets a checkpoint (export and the registry take it), and so does
        # the last one (resume); the others every `checkpoint.every` epochs.
        if improved or stop or epoch == train.epochs - 1 or (epoch + 1) % train.checkpoint.every == 0:
            worker.save_and_report(record, ckpt.stoker_state(run.state(epoch, stop, plan), engine) if rank == 0 else None)
        else:
            ray.train.report(record)  # sync: a barrier, as with a checkpoint
        if stop:
            break

    if rank != 0:
        return None
    return {"best": run.best, "history": run.history, **({"error": run.error} if run.error else {})}


@dataclass
class EpochResult:
    """One training pass."""

    loss: float
    micro_steps: int
    rows: int
    """Training rows this rank stepped over (the last batch of an epoch may be short)."""
    seconds: float
    clock: WaitClock
    step_validations: list[dict[str, Any]]
    bad_step: int | None
    times: StepTimes
    drain: Any = None
    """The `PreemptionInfo` of a node drain reported during the pass (it stopped there)."""


@dataclass
class RunState:
    """What the loop carries from epoch to epoch, and what a checkpoint restores."""

    stopping: Patience
    schedule: Any
    next_epoch: int = 0
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    resume_changes: list[str] = field(default_factory=list)
    saved_optimizer: dict[str, Any] | None = None
    error: str | None = None
    partial: Partial | None = None
    """A drain's just-in-time checkpoint was taken mid-way through this epoch: train its rest."""

    @property
    def best_score(self) -> Score | None:
        return Score(self.best["score"], self.best["loss"]) if self.best else None

    def new_best(self, epoch: int, score: Score, validation: dict, test: dict, details: dict) -> None:
        self.best = {"epoch": epoch, "score": score.metric, "loss": score.loss, "validation": validation,
                     "test": test, "test_details": details,
                     "rank": checkpoint_rank(self.best["rank"] if self.best else None, True)}

    def state(self, epoch: int, stopped: bool, plan: WorkerPlan) -> dict[str, Any]:
        return {"run": plan.run_name, "epoch": epoch, "best": self.best, "history": self.history,
                "stopping": self.stopping.state_dict(), "stopped": stopped,
                "schedule": self.schedule.state_dict() if self.schedule else None,
                "optimizer": optimizer_record(plan.train.optimizer)}

    def restore(self, state: dict[str, Any]) -> None:
        self.next_epoch, self.best, self.history = state["epoch"] + 1, state["best"], state["history"]
        if self.best is not None:  # a checkpoint written before the loss tie-break and the rank
            self.best.setdefault("loss", self.best["validation"].get("loss", float("inf")))
            self.best.setdefault("rank", 1.0)
        self.stopping.load_state_dict(state.get("stopping") or {})
        if self.schedule and state.get("schedule"):
            self.schedule.load_state_dict(state["schedule"])
        self.saved_optimizer = state.get("optimizer")
        self.partial = Partial.of(state)
        if state.get("stopped"):
            self.next_epoch = 10**9  # an early-stopped run: nothing left to train


class Worker:
    """One rank's model, data and metrics: a training pass, an evaluation, a checkpoint."""

    def __init__(self, plan: WorkerPlan, engine, rank: int, world_size: int, eval_rows: dict[str, EvalRows]) -> None:
        self.plan, self.engine, self.rank, self.world_size, self.eval_rows = plan, engine, rank, world_size, eval_rows
        self.loss_fn = build_loss(plan.train.loss, plan.task, plan.class_weights, engine.device)
        # Built at the first evaluation: importing torchmetrics takes most of a second, which
        # would otherwise delay the first training step.
        self.evaluation: m.Evaluation | None = None
        self.stragglers = StragglerWatch(engine.module, rank, world_size, engine.device, rank_name)

    def batches(self, epoch: int):
        # The shuffle seed is (seed, epoch, rank) itself, not a sum that two runs could share:
        # a resumed epoch sees the same order as an uninterrupted one.
        plan, shard = self.plan, ray.train.get_dataset_shard("train")
        for batch in iter_split(shard, plan.features, plan.train.batch_size, self.engine.device, _dtype(plan),
                                (plan.train.seed, epoch, self.rank), **plan.ingest):
            x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
            yield x, (x if plan.task == "language_modeling" else y)

    def steps_in_epoch(self) -> int | None:
        """Micro-steps of a whole epoch at this world size (Ray splits the rows equally)."""
        rows = self.plan.train_rows // self.world_size
        return -(-rows // self.plan.train.batch_size) if rows else None

    def budget(self, epoch: int, partial: Partial | None) -> int | None:
        """Micro-steps to train in `epoch`: all (None), or the rest after a drain's checkpoint."""
        steps = self.steps_in_epoch()
        if partial is None or partial.epoch != epoch or steps is None:
            return None
        return max(partial.remaining(steps), 1)

    def continue_schedule(self, scheduler, run: "RunState") -> None:
        """A step-driven schedule planned by the driver for another world size (an elastic
        resize inside one run) ends where the run now ends: the optimizer steps taken plus the
        rest at this world size's steps per epoch."""
        steps, accumulation = self.steps_in_epoch(), self.plan.train.deepspeed.gradient_accumulation_steps
        if scheduler is None or not hasattr(scheduler, "total_num_steps") or steps is None:
            return
        if planned_world_size(self.plan.deepspeed) == self.world_size and run.partial is None:
            return  # as planned (the driver rescales a resume from a whole epoch itself)
        left = (self.plan.train.epochs - run.next_epoch) * steps
        if run.partial is not None and run.partial.epoch == run.next_epoch:
            left -= steps - run.partial.remaining(steps)
        scheduler.total_num_steps = max(self.engine.global_steps + max(left // accumulation, 1), 1)

    def run_epoch(self, epoch: int, schedule, optimizer, drains: DrainWatch | None = None,
                  budget: int | None = None) -> EpochResult:
        engine, train = self.engine, self.plan.train
        accumulation = train.deepspeed.gradient_accumulation_steps
        drain = None
        engine.train()
        started, micro_steps, rows = time.perf_counter(), 0, 0
        loss_total = torch.zeros((), device=engine.device)
        first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.long, device=engine.device)
        step_validations: list[dict[str, Any]] = []
        last_validated = engine.global_steps
        clock, times = WaitClock(), StepTimes()
        for x, y in clock.iterate(self.batches(epoch)):
            if schedule:
                schedule.apply(optimizer, engine.global_steps)
            times.begin()
            scale = self.plan.target_scale  # regression: the network learns standardised targets
            loss = self.loss_fn(engine(x), scale.standardise(y) if scale else y)
            extra = penalty(train.loss, engine.module.parameters())
            if extra is not None:
                loss = loss + extra
            engine.backward(loss)  # sync: gradient all-reduce / reduce-scatter
            times.computed()
            engine.step()
            times.stepped()
            self.stragglers.stepped()  # sync: every GATHER_EVERY micro-steps (stoker.trainer.stragglers)
            detached = loss.detach().float()
            loss_total += detached  # no .item(): no per-step host sync
            first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(detached), _NO_BAD_STEP, micro_steps))
            micro_steps += 1
            rows += x.shape[0]
            if micro_steps % NAN_CHECK_EVERY == 0 and _bad_step(first_bad) is not None:
                break
            if budget is not None and micro_steps >= budget:
                break  # the rest of an epoch resumed from a drain's checkpoint
            if drains is not None and micro_steps % accumulation == 0:
                drain = drains.check()  # sync at agreed steps (stoker.trainer.preemption)
                if drain is not None:
                    break
            steps = engine.global_steps
            if train.validate_every_steps and steps != last_validated and steps % train.validate_every_steps == 0:
                last_validated = steps
                scores, _ = self.evaluate("validation")
                step_validations.append({"step": steps, **{f"val_{k}": v for k, v in scores.items()}})
        seconds = time.perf_counter() - started
        bad = _bad_step(first_bad)  # sync: the same all-reduce on every rank
        return EpochResult(float(loss_total) / max(micro_steps, 1), micro_steps, rows, seconds, clock, step_validations,
                           bad, times, drain)

    def evaluate(self, split: str, details: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics over every row of `split` (a collective: every rank calls it)."""
        engine, task = self.engine, self.plan.task
        if self.evaluation is None:
            self.evaluation = m.Evaluation(task, self.plan.num_classes, engine.device)
        engine.eval()
        self.evaluation.reset(with_details=details)
        with torch.no_grad():
            for x, y, valid in self.eval_rows[split].batches(self.plan.train.batch_size, engine.device):
                out = engine(x)  # every rank, also on a padding batch: ZeRO-3's forward is a collective
                if self.plan.target_scale:
                    out = self.plan.target_scale.original(out.float())  # metrics in the label's units
                if valid:
                    y = x if task == "language_modeling" else y
                    self.evaluation.update(out[:valid], y[:valid], self.loss_fn(out[:valid], y[:valid]), x[:valid])
        engine.train()
        return self.evaluation.compute()  # sync: all-reduce + all-gather

    def record(self, epoch: int, trained: EpochResult, validation: dict[str, float], run: RunState,
               improved: bool, stop: bool) -> dict[str, Any]:
        """The epoch's line in metrics.jsonl (rank 0's is the one the driver logs)."""
        engine, train, best = self.engine, self.plan.train, run.best
        assert best is not None
        record = {
            "epoch": epoch,
            "world_size": self.world_size,  # resizes show in the run's records and registry row
            "train_loss": trained.loss,
            "epoch_time_s": trained.seconds,
            # Rows stepped over, short last batch as it is; Ray's shards are equal across ranks.
            "samples_per_s": trained.rows * self.world_size / trained.seconds if trained.seconds else 0.0,
            "data_wait_fraction": trained.clock.fraction(),
            "first_batch_s": trained.clock.first_batch_s,
            # Where the pass went (stoker.trainer.timing): wait + compute + step + other = epoch_time_s.
            **trained.times.metrics(trained.clock.wait_s, trained.seconds),
            "lr": float(engine.get_lr()[0]) if engine.get_lr() else train.optimizer.lr,
            **{f"val_{k}": v for k, v in validation.items()},
            f"best_val_{self.plan.metric}": best["score"],
            "best_epoch": best["epoch"],
            "global_step": engine.global_steps,
            CHECKPOINT_RANK: best["rank"] if improved else checkpoint_rank(best["rank"], False),
        }
        if trained.step_validations:
            record["step_validations"] = trained.step_validations
        if run.resume_changes:
            record["resume_changes"], run.resume_changes = run.resume_changes, []
        if stop:
            record["early_stopped"] = True
        stragglers, notes = self.stragglers.take_epoch()  # rank 0's: slow during this epoch
        if stragglers:
            record["stragglers"] = stragglers
        if notes:
            record["straggler_notes"] = notes  # said once by the driver (stoker.trainer.tracking)
        return record

    def save_drained(self, epoch: int, trained: EpochResult, budget: int | None, run: "RunState") -> None:
        """The just-in-time checkpoint of a drain: the training state as of the last whole
        epoch plus where in `epoch` it stopped, reported as an event, not an epoch record."""
        steps = self.steps_in_epoch() or trained.micro_steps
        done = (steps - (budget if budget is not None else steps)) + trained.micro_steps
        partial = Partial(epoch, min(done / steps, 1.0), done, self.world_size)
        info = trained.drain  # the driver says it in one line (stoker.trainer.run._say_event)
        state = None
        if self.rank == 0:
            state = ckpt.stoker_state({**run.state(epoch - 1, False, self.plan), "partial": asdict(partial)},
                                      self.engine)
        record = {"epoch": epoch - 1, "world_size": self.world_size, "global_step": self.engine.global_steps,
                  "preempted": {"cause": "stop" if isinstance(info, StopRequest) else "drain",
                                "epoch": epoch, "micro_step": done, "steps_in_epoch": steps,
                                "nodes": list(info.preempted_node_ids), "ranks": list(info.preempted_ranks),
                                "deadline_ms": info.deadline_ms},
                  CHECKPOINT_RANK: checkpoint_rank(run.best["rank"], False) if run.best else 0.5}
        self.save_and_report(record, state)

    def save_and_report(self, record: dict[str, Any], state: dict[str, Any] | None) -> None:
        with tempfile.TemporaryDirectory() as directory:
            saving = time.perf_counter()
            # Every DeepSpeed file then names its checkpoint: a shard from another one is refused.
            checkpoint_guard.stamp(self.engine, self.plan.run_name, record["epoch"])
            self.engine.save_checkpoint(directory, tag=ckpt.CHECKPOINT_TAG)  # every rank writes its shard
            ckpt.finish(Path(directory), self.rank, state)
            record["checkpoint_s"] = time.perf_counter() - saving  # writing it, before the report
            # Sync: report is a barrier; Ray merges every rank's files into one checkpoint.
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _dtype(plan: WorkerPlan) -> torch.dtype:
    ds = plan.train.deepspeed
    return torch.bfloat16 if ds.bf16 else torch.float16 if ds.fp16 else torch.float32


def _nan_message(epoch: int, step: int) -> str:
    last_good = f"epoch {epoch - 1}" if epoch > 0 else "none: it failed in the first epoch"
    return (f"train: the loss became NaN/inf at epoch {epoch}, step {step} of the epoch; training stopped and "
            f"the last good checkpoint is kept ({last_good}); lower train.optimizer.lr or set "
            "train.deepspeed.gradient_clipping")


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
    """Load the latest checkpoint, or the newest earlier one if it fails its checksums or
    cannot be converted for this world size and ZeRO stage. `verify` also has every pickle in
    it checked (stoker.trainer.checkpoint_guard) before anything unpickles them; one that is
    unsafe to load stops the run."""
    now = (dist.get_world_size(), engine.zero_optimization_stage())
    first_problem = None
    for candidate in _candidates(directory, stored_at):
        problem = ckpt.verify(candidate)
        if problem is not None:
            problem = f"is corrupt ({problem})"
        else:
            try:
                # None: DeepSpeed loads it as it is (same world size and stage, or ZeRO-0).
                consolidated = resize.resume_state(candidate, *now)
                break
            except resize.ConversionError as error:
                problem = f"cannot be converted for {now[0]} workers at ZeRO stage {now[1]} ({error})"
        first_problem = first_problem or problem
    else:
        raise RuntimeError(f"checkpoint {stored_at.name} {first_problem} and no earlier one is intact")
    if first_problem is not None and rank == 0:
        print(f"stoker: checkpoint {stored_at.name} {first_problem}; resuming from {candidate.name}", flush=True)
    if consolidated is None:
        engine.load_checkpoint(str(candidate), tag=ckpt.CHECKPOINT_TAG)
    else:
        resize.load(engine, consolidated)
    ckpt.restore_rng(candidate, rank)
    return ckpt.read_state(candidate)


def _candidates(directory: Path, stored_at: Path):
    """The checkpoint Ray handed over, then (looked up only if it is unusable) the earlier ones
    beside it, newest first: local/shared storage only, where they are directories next to it."""
    yield directory
    yield from (c for c in ckpt.local_checkpoints(stored_at.parent) if c.resolve() != stored_at.resolve())
