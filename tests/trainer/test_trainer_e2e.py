"""End-to-end trainings on the session's 2-CPU local Ray cluster: reproducibility, a worker
killed mid-epoch, NaN loss, report/TensorBoard, export and evaluate (corrupt checkpoints: the
note at the end)."""

import json
import os
import re
import signal
import threading
import time

import psutil
import pytest

from stoker.cli import main
from stoker.config import parse_config
from stoker.errors import UserError
from stoker.trainer.run import train
from tests.conftest import copy_run, train_workers

pytestmark = pytest.mark.slow

# Small batches make an epoch long enough (~80 steps per rank) to hang or kill a worker inside it.
FAULT_TRAIN = {"epochs": 3, "batch_size": 8, "seed": 7, "optimizer": {"name": "adamw", "lr": 0.002},
               "deepspeed": {"zero_stage": 2}, "max_failures": 2, "collective_timeout_s": 8}


def make_run(base, tmp_path, name, **train):
    config = dict(base, name=name, storage=str(tmp_path / "runs"))
    # Block order fixed: the trainer's own shuffle (seeded per epoch and rank) is what varies.
    config["data"] = {**base["data"], "ingest": {"shuffle_files": False}}
    config["train"] = {**base["train"], **train}
    return parse_config(config, "test")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_hung_then_a_killed_worker_change_nothing(ray_cluster, prepared, tmp_path, capsys):
    """One run, two failures: a worker frozen (SIGSTOP: alive, holding its place in every
    collective) in epoch 1 fails the attempt within train.collective_timeout_s, naming it, and
    the run resumes from epoch 0's checkpoint; a worker killed (SIGKILL) in epoch 2 resumes it
    from epoch 1's. The run ends as the same run uninterrupted. (Bit-for-bit reproducibility of a
    resume is test_ingest's test_a_training_resumed_from_an_earlier_epoch_logs_the_same_metrics_bit_for_bit.)"""
    first = train(make_run(prepared, tmp_path, "plain", **FAULT_TRAIN))
    plain = lines(first.run_dir / "metrics.jsonl")

    run = make_run(prepared, tmp_path, "faulty", **FAULT_TRAIN)
    run_dir = tmp_path / "runs" / "faulty"
    metrics, events = run_dir / "metrics.jsonl", run_dir / "events.jsonl"
    faults: dict = {}

    def in_epoch(epoch):
        """A worker of the group training `epoch`, 0.3 s into its steps."""
        _wait_for(lambda: len(lines(metrics)) >= epoch)
        time.sleep(0.3)
        _wait_for(lambda: train_workers() or len(lines(metrics)) > epoch)  # titles name the class once it runs
        return len(lines(metrics)), train_workers()[-1]

    def hang_then_kill():
        faults["hung_before"], worker = in_epoch(1)
        faults["hung"], frozen_at = worker.pid, time.monotonic()
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            _wait_for(lambda: lines(events) or time.monotonic() - frozen_at > 90)
            faults["failed_after"] = time.monotonic() - frozen_at
        finally:
            os.kill(worker.pid, signal.SIGCONT)  # it recovers; Ray then ends the old worker group
        faults["killed_before"], worker = in_epoch(2)
        faults["killed"] = worker.pid
        os.kill(worker.pid, signal.SIGKILL)

    faulter = threading.Thread(target=hang_then_kill, daemon=True)
    faulter.start()
    capsys.readouterr()
    result = train(run)
    faulter.join(timeout=5)
    err = capsys.readouterr().err
    # One line of stoker's per failure instead of Ray's raw worker-death output.
    said = [line for line in err.splitlines() if line.startswith("stoker: worker rank")]
    assert len(said) == 2, err[-3000:]
    hung = re.fullmatch(
        r"stoker: worker rank (\d) failed \(a collective did not complete within 8 s \(train.collective_timeout_s\): "
        rf"rank (\d) \(node [\d.]+, pid {faults['hung']}\) did not arrive\); restarting the workers from epoch "
        r"0's checkpoint, attempt 1 of 2 \(train.max_failures\)", said[0])
    assert hung and hung.group(1) != hung.group(2), said[0]
    assert said[1].endswith("restarting the workers from epoch 1's checkpoint, attempt 2 of 2 (train.max_failures)")

    assert (faults["hung_before"], faults["killed_before"]) == (1, 2), "a fault landed outside its epoch"
    # The collective timeout and the roll call, not Ray's 10-minute health check.
    assert faults["failed_after"] < 8 + 8 + 10, faults
    assert not psutil.pid_exists(faults["killed"]) or psutil.Process(faults["killed"]).status() == psutil.STATUS_ZOMBIE
    failures = lines(events)
    assert len(failures) == 2 and failures[0]["ranks"] == [int(hung.group(1))]
    records = lines(metrics)
    assert [r["epoch"] for r in records] == [0, 1, 2]  # epochs 1 and 2 each ran again from the checkpoint before
    assert all("stragglers" not in r for r in records)
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


def test_evaluate_matches_training_test_metrics(finished_run, prepared, tmp_path):
    from stoker.trainer.evaluate import evaluate_export
    from stoker.trainer.export import export_run

    # ZeRO-3 (parameters sharded across ranks, merged by export): the session's finished run;
    # stage 2 is test_report_tensorboard_export_and_evaluate's.
    result = finished_run
    export = export_run(copy_run(result.run_dir, tmp_path))
    scores = evaluate_export(export, prepared["data"]["output"])
    assert scores["metrics"]["accuracy"] == pytest.approx(result.test["accuracy"], abs=1e-6)
    assert scores["metrics"]["loss"] == pytest.approx(result.test["loss"], rel=1e-4)


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


# A corrupt latest checkpoint (the fallback to the previous one, its warning, each epoch listed
# once, and the one-line stop when none is intact) is tests/datasets/test_ingest.py's
# test_a_training_resumed_from_an_earlier_epoch_logs_the_same_metrics_bit_for_bit: the same two
# trainings, which that test also compares bit for bit.
