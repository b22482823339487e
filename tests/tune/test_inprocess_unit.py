"""The in-process trial's pieces without a Ray cluster: `InProcessTrain` serving the Train API
(context, reports, checkpoints persisted and ranked by Ray Train's own manager into the run
directory, the resume checkpoint from its snapshot) and `_process_group`'s world of one.

`run_in_process` as a whole needs Ray Data's datasets (a cluster); the slow end-to-end test
(tests/tune/test_tune_inprocess.py) runs it."""

import json
import os

import pytest
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig

from stoker.ray_internals import set_train_fn_utils, train_api_in_this_thread
from stoker.trainer.ranking import CHECKPOINT_RANK
from stoker.tune.inprocess import InProcessTrain, _process_group

SNAPSHOT = "checkpoint_manager_snapshot.json"


def _keep_two() -> CheckpointConfig:
    """As the trainer configures it: ranked by the loop's checkpoint rank, the best kept."""
    return CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=CHECKPOINT_RANK, checkpoint_score_order="max")


def _epoch_checkpoint(tmp_path, epoch: int) -> ray.train.Checkpoint:
    directory = tmp_path / f"worker-{epoch}"
    directory.mkdir()
    (directory / "state.json").write_text(json.dumps({"epoch": epoch}))
    return ray.train.Checkpoint.from_directory(directory)


def test_reports_persist_rank_and_resume_checkpoints_in_the_run_directory(tmp_path):
    connected = ray.is_initialized()  # the suite's session cluster may be up already
    storage, reported = tmp_path / "storage", []
    api = InProcessTrain("trial", str(storage), _keep_two(), {}, None,
                         lambda metrics, persisted: reported.append((metrics, persisted)))
    assert api.get_checkpoint() is None  # a new run: nothing to resume
    set_train_fn_utils(api)
    try:
        with train_api_in_this_thread():
            # The loop's own calls (stoker.trainer.loop), served in this thread.
            context = ray.train.get_context()
            assert (context.get_world_rank(), context.get_world_size(), context.get_experiment_name()) == (0, 1, "trial")
            assert ray.train.get_checkpoint() is None
            for epoch, rank in enumerate([1.0, 2.0, 1.5, 1.0]):
                ray.train.report({"epoch": epoch, CHECKPOINT_RANK: rank},
                                 checkpoint=_epoch_checkpoint(tmp_path, epoch))
            ray.train.report({"epoch": 4, CHECKPOINT_RANK: 0.5})  # an epoch without a checkpoint
    finally:
        set_train_fn_utils(None)
    assert ray.is_initialized() == connected  # no cluster was started for any of it

    assert [m["epoch"] for m, _ in reported] == [0, 1, 2, 3, 4]
    paths = [p.path if p is not None else None for _, p in reported]
    assert paths[4] is None and all(p.startswith(str(storage / "trial" / "checkpoint_")) for p in paths[:4])
    for epoch, path in enumerate(paths[:4]):
        if os.path.isdir(path):  # persisted: a copy of what the worker wrote
            assert json.loads(open(os.path.join(path, "state.json")).read()) == {"epoch": epoch}
    # Ray Train's ranking: the two best (ranks 2.0 and 1.5) and the latest stay; epoch 0 is gone.
    assert [os.path.isdir(p) for p in paths[:4]] == [False, True, True, True]
    snapshot = json.loads((storage / "trial" / SNAPSHOT).read_text())
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == os.path.basename(paths[3])

    # The same run in a later trial (or a TorchTrainer of the same name) resumes from the latest.
    again = InProcessTrain("trial", str(storage), _keep_two(), {}, None, None)
    assert again.get_checkpoint().path == paths[3]
    assert again.get_preemption_info() is None and not again.is_distributed()
    assert again.broadcast_from_rank_zero({"x": 1}) == {"x": 1} and again.get_all_reported_checkpoints() == []


def test_process_group_is_a_world_of_one_and_leaves_nothing_behind():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    ports = []
    for _ in range(2):  # a reused trial process starts a new world for its next trial
        with _process_group():
            assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_rank() == 0
            assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
            ports.append(os.environ["MASTER_PORT"])
            value = torch.tensor([3.0])
            dist.all_reduce(value)
            assert value.item() == 3.0
        assert not dist.is_initialized()
        assert {k: os.environ.get(k) for k in before} == before


def test_a_second_trial_in_the_same_process_trains_in_a_new_world():
    """DeepSpeed keeps its own handles on the world (ZeRO all-reduces on a clone of the world
    group): ended through torch alone, the next trial's ZeRO-2 engine steps on a group of the
    dead world and fails ("Group ... is not registered"); `_process_group` ends it through
    DeepSpeed."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from stoker.trainer.config import ModelConfig, TrainConfig
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.deepspeed_engine import build_engine
    from stoker.trainer.models import InputSpec

    train = TrainConfig(batch_size=8, deepspeed={"zero_stage": 2})
    spec = InputSpec("tabular", (4,), 2, "classification")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: thread hand-offs cost more than the steps
    try:
        for trial in range(2):
            with _process_group():
                torch.manual_seed(trial)
                engine, _, _ = build_engine(ModelConfig(name="mlp", hidden=[8]), spec, deepspeed_config(train, 1, 4))
                x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
                engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
                engine.step()
                assert engine.global_steps == 1
                del engine
            assert not dist.is_initialized()
    finally:
        torch.set_num_threads(threads)
