"""End-to-end trainings on the session's 2-CPU local Ray cluster: reproducibility, a worker
killed mid-epoch, NaN loss, corrupt checkpoints, report/TensorBoard, export and evaluate."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from stoker.cli import main
from stoker.config import parse_config
from stoker.errors import UserError
from stoker.trainer.run import train
from tests.conftest import best_epoch_of, train_workers

pytestmark = pytest.mark.slow

# Small batches make an epoch long enough (~80 steps per rank) to kill a worker inside it.
FAULT_TRAIN = {"epochs": 3, "batch_size": 8, "seed": 7, "optimizer": {"name": "adamw", "lr": 0.002},
               "deepspeed": {"zero_stage": 2}, "max_failures": 1}


def make_run(base, tmp_path, name, **train):
    config = dict(base, name=name, storage=str(tmp_path / "runs"))
    # Block order fixed: the trainer's own shuffle (seeded per epoch and rank) is what varies.
    config["data"] = {**base["data"], "ingest": {"shuffle_files": False}}
    config["train"] = {**base["train"], **train}
    return parse_config(config, "test")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_worker_changes_nothing(ray_cluster, prepared, tmp_path, capsys):
    # Bit-for-bit reproducibility of two uninterrupted runs is test_ingest's
    # test_two_trainings_with_the_same_seed_log_the_same_metrics; here the reference is one run.
    first = train(make_run(prepared, tmp_path, "plain", **FAULT_TRAIN))
    plain = lines(first.run_dir / "metrics.jsonl")

    run = make_run(prepared, tmp_path, "killed", **FAULT_TRAIN)
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    killed: dict = {}

    def kill_in_epoch_1():
        while not (metrics.exists() and len(lines(metrics)) >= 1):
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 1's training steps
        workers = train_workers()
        while not workers and len(lines(metrics)) == 1:  # titles name the actor class once it runs
            time.sleep(0.05)
            workers = train_workers()
        killed["reported_before"] = len(lines(metrics))
        killed["pid"] = workers[-1].pid
        os.kill(workers[-1].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_in_epoch_1, daemon=True)
    killer.start()
    capsys.readouterr()
    result = train(run)
    killer.join(timeout=5)
    # One line of stoker's instead of Ray's raw worker-death output.
    restarts = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stoker: worker rank")]
    assert len(restarts) == 1 and restarts[0].endswith(
        "restarting the workers from epoch 0's checkpoint, attempt 1 of 1 (train.max_failures)"), restarts

    assert killed["reported_before"] == 1, "the worker was killed after epoch 1 finished, not inside it"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    records = lines(metrics)
    assert [r["epoch"] for r in records] == [0, 1, 2]  # epoch 1 ran again from epoch 0's checkpoint
    for mine, reference in zip(records, plain, strict=True):
        assert mine["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4, abs=1e-5)
        assert mine["val_accuracy"] == pytest.approx(reference["val_accuracy"], abs=1e-3)
    assert result.test == pytest.approx(first.test, rel=1e-4, abs=1e-5)


def test_report_tensorboard_export_and_evaluate(ray_cluster, prepared, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_run(prepared, tmp_path, "full", epochs=4, batch_size=32,
                   loss={"class_weights": "balanced", "label_smoothing": 0.05},
                   schedule={"name": "plateau", "patience": 0, "gamma": 0.5},
                   early_stopping={"patience": 2}, checkpoint={"keep": 1}, validate_every_steps=10)
    result = train(run)
    run_dir = result.run_dir
    assert result.test["accuracy"] > 0.8, result.test
    final = json.loads((run_dir / "final_metrics.json").read_text())
    matrix = final["test_details"]["confusion_matrix"]
    test_rows = json.loads((run_dir / "dataset.json").read_text())["rows"]["test"]
    assert sum(map(sum, matrix)) == test_rows and len(matrix) == 10
    correct = sum(matrix[i][i] for i in range(10))
    assert correct / test_rows == pytest.approx(result.test["accuracy"], abs=1e-6)
    page = (run_dir / "report.html").read_text()
    assert "Worst classes" in page and "Most confidently wrong" in page
    assert all((run_dir / png).stat().st_size > 1000 for png in ("learning_curves.png", "confusion_matrix.png", "per_class.png"))
    records = lines(run_dir / "metrics.jsonl")
    assert records[0]["step_validations"][0]["step"] == 10
    # keep 1 by metric, plus the latest that Ray always keeps for resume.
    assert 1 <= len(list(run_dir.glob("checkpoint_*"))) <= 2

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_accuracy")] == [r["epoch"] for r in records]
    assert events.Scalars("train_loss")[0].value == pytest.approx(records[0]["train_loss"], rel=1e-5)
    assert "steps/val_loss" in events.Tags()["scalars"]

    assert main(["export", str(run_dir)]) == 0
    export = run_dir / "export"
    meta = json.loads((export / "model.json").read_text())
    assert meta["epoch"] == result.best_epoch and meta["classes"] == list(range(10))
    assert "transform" in meta and (export / "config.yaml").exists()
    # Imported with weights_only-free safetensors; the rebuilt model scores the best epoch's test.
    data = prepared["data"]["output"]
    capsys.readouterr()
    code = main(["evaluate", str(export), "--data", data, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    scores = json.loads(out)
    assert scores["rows"] == test_rows
    assert scores["metrics"]["accuracy"] == pytest.approx(result.test["accuracy"], abs=1e-6)
    assert scores["metrics"]["loss"] == pytest.approx(result.test["loss"], rel=1e-4)


def test_evaluate_matches_training_test_metrics(ray_cluster, prepared, tmp_path):
    from stoker.trainer.evaluate import evaluate_export
    from stoker.trainer.export import export_run

    # ZeRO-3 (parameters sharded across ranks, merged by export); stage 2 is
    # test_report_tensorboard_export_and_evaluate's.
    for stage in (3,):
        run = make_run(prepared, tmp_path, f"export-z{stage}", epochs=2, deepspeed={"zero_stage": stage})
        result = train(run)
        export = export_run(result.run_dir)
        scores = evaluate_export(export, prepared["data"]["output"])
        assert scores["metrics"]["accuracy"] == pytest.approx(result.test["accuracy"], abs=1e-6), stage
        assert scores["metrics"]["loss"] == pytest.approx(result.test["loss"], rel=1e-4), stage


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(ray_cluster, prepared, tmp_path):
    sgd = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
    first = train(make_run(prepared, tmp_path, "nan", epochs=1, optimizer=sgd))
    kept = sorted(first.run_dir.glob("checkpoint_*"))
    with pytest.raises(UserError) as info:
        # Resume at epoch 1 with an absurd rate (the step schedule sets it on every step, where
        # a constant rate would come back from the checkpoint): the weights blow up.
        train(make_run(prepared, tmp_path, "nan", epochs=3, optimizer={**sgd, "lr": 1e12},
                       schedule={"name": "step", "step_epochs": 100}, max_failures=0))
    message = str(info.value)
    assert message.startswith("train: the loss became NaN/inf at epoch 1, step ")
    assert "last good checkpoint is kept (epoch 0)" in message and "\n" not in message
    assert sorted(first.run_dir.glob("checkpoint_*")) == kept
    assert [r["epoch"] for r in lines(first.run_dir / "metrics.jsonl")] == [0]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(ray_cluster, prepared, tmp_path, capsys):
    from stoker.trainer import checkpoints as ckpt

    run_dir = train(make_run(prepared, tmp_path, "corrupt", epochs=2, checkpoint={"keep": 2})).run_dir
    newest = ckpt.local_checkpoints(run_dir)[0]
    assert ckpt.epoch_of(newest) == 1
    shard = next(newest.rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    capsys.readouterr()
    result = train(make_run(prepared, tmp_path, "corrupt", epochs=3, checkpoint={"keep": 2}))
    err = capsys.readouterr().err
    assert f"checkpoint {newest.name} is corrupt ({shard.relative_to(newest)} fails its SHA-256 check" in err
    assert "(epoch 0)" in err
    # Epoch 1 is trained again from epoch 0's checkpoint; the log lists each epoch once.
    assert [r["epoch"] for r in lines(run_dir / "metrics.jsonl")] == [0, 1, 2]
    assert result.best_epoch == best_epoch_of(lines(run_dir / "metrics.jsonl"))

    for path in ckpt.local_checkpoints(run_dir):
        victim = next(path.rglob("*model_states.pt"))
        victim.write_bytes(b"")
    with pytest.raises(UserError, match="checkpoint is corrupt .* and no earlier checkpoint is intact; rerun with --fresh"):
        train(make_run(prepared, tmp_path, "corrupt", epochs=4))
