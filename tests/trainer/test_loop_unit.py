"""The worker loop's pieces without Ray: the step arithmetic of a resumed or resized epoch, the
state a checkpoint carries, early stopping, and a real one-process DeepSpeed engine (CPU, gloo,
world size 1) stepping through `Worker.run_epoch` over batches held in memory.

`Worker.batches` (Ray Data's shard, the one part that needs a Ray Train worker) is replaced by an
in-memory iterator; everything else is the loop's own code on a real engine."""

import math
import os
from types import SimpleNamespace

import pytest
import torch

from stoker.environment import patched_environ
from stoker.trainer.config import ModelConfig, TrainConfig
from stoker.trainer.deepspeed_config import deepspeed_config
from stoker.trainer.loop import NAN_CHECK_EVERY, RunState, Worker, _agree, _bad_step, _nan_message
from stoker.trainer.models import InputSpec
from stoker.trainer.plan import WorkerPlan
from stoker.trainer.preemption import Partial
from stoker.trainer.ranking import Patience, Score
from tests.ports import free_port

FEATURES, CLASSES, BATCH = 12, 3, 8
SPEC = InputSpec("tabular", (FEATURES,), CLASSES, "classification")
MODEL = ModelConfig(name="mlp", hidden=[32])


def _plan(train: TrainConfig, world_size: int = 1, train_rows: int = 0, ds: dict | None = None) -> WorkerPlan:
    return WorkerPlan(
        run_name="unit", train=train, model=MODEL, spec=SPEC, features=[f"f{i}" for i in range(FEATURES)],
        num_classes=CLASSES, metric="accuracy", deepspeed=ds or deepspeed_config(train, world_size, 10),
        eval_rows={"validation": 0, "test": 0}, eval_files={}, train_rows=train_rows,
    )


def _arithmetic_worker(train_rows: int, world_size: int, planned_world: int, epochs: int = 10,
                       accumulation: int = 1, global_steps: int = 0) -> Worker:
    """A Worker for the methods that only do arithmetic on the plan (no step is taken): its
    engine is a stand-in with the attributes those methods and the constructor read."""
    train = TrainConfig(batch_size=BATCH, epochs=epochs, deepspeed={"gradient_accumulation_steps": accumulation})
    plan = _plan(train, train_rows=train_rows, ds=deepspeed_config(train, planned_world, 10))
    engine = SimpleNamespace(device=torch.device("cpu"), module=torch.nn.Linear(1, 1), global_steps=global_steps)
    return Worker(plan, engine, 0, world_size, {})


# ------------------------------------------------------------------ steps, budget, schedule


def test_steps_in_epoch_splits_rows_equally_and_rounds_the_last_batch_up():
    assert _arithmetic_worker(100, 1, 1).steps_in_epoch() == 13  # 100 rows / 8 -> 12 + a short one
    assert _arithmetic_worker(100, 3, 3).steps_in_epoch() == 5  # 33 rows each (Ray drops the rest)
    assert _arithmetic_worker(64, 2, 2).steps_in_epoch() == 4
    assert _arithmetic_worker(0, 2, 2).steps_in_epoch() is None  # an older plan without train_rows


def test_budget_trains_the_rest_of_a_drained_epoch():
    worker = _arithmetic_worker(80, 1, 1)  # 10 steps per epoch
    assert worker.budget(3, None) is None
    half = Partial(epoch=3, fraction=0.4, micro_steps=8, world_size=2)  # saved at another world size
    assert worker.budget(3, half) == 6
    assert worker.budget(4, half) is None  # only the epoch it stopped in
    assert worker.budget(3, Partial(3, 1.0, 10, 1)) == 1  # never 0: an epoch takes at least a step
    assert _arithmetic_worker(0, 1, 1).budget(3, half) is None  # no row count: the whole epoch


def test_continue_schedule_ends_where_the_resized_run_ends():
    scheduler = SimpleNamespace(total_num_steps=999)
    stopping = Patience(None, "max")
    # As planned (same world size, no partial epoch): the driver's plan stands.
    _arithmetic_worker(100, 2, 2).continue_schedule(scheduler, RunState(stopping, None))
    assert scheduler.total_num_steps == 999
    # Planned for 4 workers, running on 2: 50 rows -> 7 steps per epoch, 7 epochs left,
    # 2 micro-steps per optimizer step, after 30 optimizer steps.
    worker = _arithmetic_worker(100, 2, 4, epochs=10, accumulation=2, global_steps=30)
    worker.continue_schedule(scheduler, RunState(stopping, None, next_epoch=3))
    assert scheduler.total_num_steps == 30 + (7 * 7) // 2
    # Resumed half-way through epoch 3: its trained steps are not counted again.
    run = RunState(stopping, None, next_epoch=3, partial=Partial(3, 0.5, 4, 4))
    worker.continue_schedule(scheduler, run)
    assert scheduler.total_num_steps == 30 + (7 * 7 - (7 - Partial(3, 0.5, 4, 4).remaining(7))) // 2
    # A partial epoch at the planned size also re-plans; no step-driven scheduler: nothing to do.
    same = _arithmetic_worker(100, 2, 2, epochs=10, global_steps=5)
    same.continue_schedule(scheduler, RunState(stopping, None, next_epoch=9, partial=Partial(9, 0.0, 0, 2)))
    assert scheduler.total_num_steps == 5 + 7
    plain = SimpleNamespace()
    worker.continue_schedule(plain, run)
    worker.continue_schedule(None, run)
    assert not hasattr(plain, "total_num_steps")


# ----------------------------------------------------------------------- run state, patience


def test_patience_counts_validations_without_improvement():
    patience = Patience(2, "max")
    assert patience.update(Score(0.5, 1.0)) and not patience.exhausted
    assert not patience.update(Score(0.5, 1.1)) and not patience.exhausted  # equal metric, worse loss
    assert patience.update(Score(0.5, 0.9))  # equal metric, lower loss: an improvement
    assert not patience.update(Score(0.4, 0.1))
    assert not patience.update(Score(float("nan"), 0.1)) and patience.exhausted  # NaN never improves
    restored = Patience(2, "max")
    restored.load_state_dict(patience.state_dict())
    assert (restored.best, restored.since, restored.exhausted) == (Score(0.5, 0.9), 2, True)
    restored.load_state_dict({"best": 0.7, "since": 1})  # a checkpoint from before the loss tie-break
    assert restored.best == Score(0.7, float("inf")) and restored.since == 1
    zero = Patience(0, "min")  # acts at every epoch without an improvement
    zero.update(Score(1.0, 1.0))
    assert not zero.exhausted and not zero.update(Score(1.0, 1.0)) and zero.exhausted
    never = Patience(None, "min")
    for _ in range(5):
        never.update(Score(9.0, 9.0))
    assert not never.exhausted
    delta = Patience(1, "min", min_delta=0.1)
    delta.update(Score(1.0, 1.0))
    assert not delta.update(Score(0.95, 0.0)) and delta.exhausted  # within min_delta: no improvement


def test_run_state_round_trips_through_a_checkpoint_state():
    train = TrainConfig(batch_size=BATCH, epochs=5, early_stopping={"patience": 3})
    run = RunState(Patience(3, "max"), None)
    assert run.best_score is None
    run.new_best(0, Score(0.6, 0.9), {"accuracy": 0.6, "loss": 0.9}, {}, {})
    run.stopping.update(Score(0.6, 0.9))
    run.new_best(2, Score(0.8, 0.5), {"accuracy": 0.8, "loss": 0.5}, {"accuracy": 0.7}, {})
    assert run.best["rank"] == 2.0 and run.best_score == Score(0.8, 0.5)
    run.history = [{"epoch": e} for e in range(3)]
    state = run.state(2, False, _plan(train))
    assert state["run"] == "unit" and state["epoch"] == 2 and state["optimizer"]["lr"] == train.optimizer.lr

    resumed = RunState(Patience(3, "max"), None)
    resumed.restore({**state, "partial": {"epoch": 3, "fraction": 0.25, "micro_steps": 2, "world_size": 2}})
    assert resumed.next_epoch == 3 and resumed.best == run.best and resumed.history == run.history
    assert resumed.stopping.best == Score(0.6, 0.9) and resumed.partial == Partial(3, 0.25, 2, 2)
    assert resumed.saved_optimizer == state["optimizer"]

    stopped = RunState(Patience(3, "max"), None)
    stopped.restore({**state, "stopped": True})
    assert stopped.next_epoch >= train.epochs  # an early-stopped run trains no more
    old = RunState(Patience(3, "max"), None)  # a checkpoint from before the loss and the rank
    old.restore({"epoch": 1, "history": [], "best": {"epoch": 1, "score": 0.5, "validation": {"loss": 0.7}}})
    assert old.best["loss"] == 0.7 and old.best["rank"] == 1.0 and old.partial is None


def test_nan_message_names_the_epoch_the_step_and_the_kept_checkpoint():
    assert "epoch 4, step 17" in _nan_message(4, 17) and "(epoch 3)" in _nan_message(4, 17)
    assert "none: it failed in the first epoch" in _nan_message(0, 0)


# ------------------------------------------------------------------ a real engine, one rank


@pytest.fixture(scope="module")
def world():
    """A one-process gloo world, joined through DeepSpeed as a Train worker joins Ray's; torn
    down through DeepSpeed so that nothing of it outlives the module."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "TQDM_DISABLE": "1"}
    # One intra-op thread: a tiny model's steps on a shared, busy CPU take 1-2 ms instead of
    # tens (the thread pool's hand-offs cost more than the arithmetic).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with patched_environ(env):
        deepspeed.init_distributed(dist_backend="gloo")
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            if deepspeed.comm.is_initialized():
                deepspeed.comm.destroy_process_group()
            elif dist.is_initialized():
                dist.destroy_process_group()


def _engine_worker(zero_stage: int = 0, lr: float = 0.05, train_rows: int = 0):
    from stoker.trainer.deepspeed_engine import build_engine

    train = TrainConfig(batch_size=BATCH, epochs=3, optimizer={"name": "adamw", "lr": lr},
                        deepspeed={"zero_stage": zero_stage})
    plan = _plan(train, train_rows=train_rows)
    torch.manual_seed(0)
    engine, optimizer, _ = build_engine(MODEL, SPEC, plan.deepspeed)
    return Worker(plan, engine, 0, 1, {}), optimizer


def _data(rows: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable task (the class is the argmax of a fixed linear map), in batches of 8; the
    last batch is short when `rows` is not a multiple of 8."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=generator)
    y = (x @ torch.randn(FEATURES, CLASSES, generator=generator)).argmax(dim=1)
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, rows, BATCH)]


def _feed(worker: Worker, batches) -> None:
    worker.batches = lambda epoch: iter(batches)  # the seam: Ray Data's shard in a Train worker


def test_run_epoch_trains_counts_steps_and_rows(world):
    worker, optimizer = _engine_worker(train_rows=157)
    batches = _data(157)
    _feed(worker, batches)
    first = worker.run_epoch(0, None, optimizer)
    assert first.micro_steps == 20 and first.rows == 157  # 19 whole batches and one of 5 rows
    assert worker.steps_in_epoch() == first.micro_steps
    assert first.bad_step is None and first.drain is None and first.step_validations == []
    assert math.isfinite(first.loss) and first.seconds > 0 and worker.engine.global_steps == 20
    last = first
    for epoch in (1, 2):
        last = worker.run_epoch(epoch, None, optimizer)
    assert last.loss < 0.7 * first.loss, (first.loss, last.loss)
    assert worker.engine.global_steps == 60

    # A resumed epoch stops after its budget; the rows are the batches it stepped over.
    partial = worker.run_epoch(3, None, optimizer, budget=worker.budget(3, Partial(3, 0.75, 15, 1)))
    assert partial.micro_steps == 5 and partial.rows == 40

    # The epoch's record: samples/s is rows stepped over per second, the step counters the engine's.
    run = RunState(Patience(None, "max"), None)
    run.new_best(3, Score(0.9, 0.3), {"accuracy": 0.9, "loss": 0.3}, {}, {})
    record = worker.record(3, partial, {"accuracy": 0.9, "loss": 0.3}, run, True, False)
    assert record["samples_per_s"] == pytest.approx(40 / partial.seconds)
    assert record["train_loss"] == partial.loss and record["global_step"] == 65
    assert record["world_size"] == 1 and record["best_epoch"] == 3 and record["lr"] == pytest.approx(0.05)


def test_run_epoch_finds_the_first_non_finite_step(world):
    worker, optimizer = _engine_worker()
    batches = _data(80)
    x, y = batches[4]
    batches[4] = (x.clone().index_fill_(0, torch.tensor([2]), float("nan")), y)
    _feed(worker, batches)
    result = worker.run_epoch(0, None, optimizer)
    assert result.bad_step == 4 and result.micro_steps == 10  # checked at the epoch's end
    # A long epoch stops at the next cross-rank check instead of training on NaN weights.
    long = _data(BATCH * (NAN_CHECK_EVERY + 10), seed=1)
    long[7] = (torch.full_like(long[7][0], float("inf")), long[7][1])
    worker, optimizer = _engine_worker()
    _feed(worker, long)
    result = worker.run_epoch(0, None, optimizer)
    assert result.bad_step == 7 and result.micro_steps == NAN_CHECK_EVERY


def test_collectives_of_a_world_of_one(world):
    assert _agree(torch.device("cpu"), True, False, True) == [True, False, True]
    from stoker.trainer.loop import _NO_BAD_STEP

    assert _bad_step(torch.tensor(_NO_BAD_STEP)) is None
    assert _bad_step(torch.tensor(3)) == 3
    assert os.environ["WORLD_SIZE"] == "1"
