"""train.collective_timeout_s: a bad value is refused naming the key; a collective that does not
complete in time fails with one line naming the rank that did not arrive (two real gloo
processes, no Ray), and on a real run the attempt fails that way and the run resumes from its
checkpoint (a worker frozen with SIGSTOP)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from stoker.config import parse_config
from stoker.errors import UserError
from tests.conftest import REPO, run_cli, run_config, train_workers, write_config


@pytest.mark.parametrize("value", [0, -5])
def test_a_timeout_that_is_not_positive_is_refused_naming_the_key(value):
    config = run_config(REPO / "x.csv", REPO / "out", REPO / "runs")
    config["train"]["collective_timeout_s"] = value
    with pytest.raises(UserError) as info:
        parse_config(config, "run.yaml")
    assert str(info.value) == f"train.collective_timeout_s: input should be greater than 0, got {value} (run.yaml)"


def test_stoker_train_exits_2_with_one_line(tmp_path, capsys):
    config = run_config(tmp_path / "x.csv", tmp_path / "out", tmp_path / "runs")
    config["train"]["collective_timeout_s"] = 0
    code, out, err = run_cli(capsys, "train", str(write_config(tmp_path, config)))
    assert (code, out) == (2, "")
    assert err == "stoker: error: train.collective_timeout_s: input should be greater than 0, got 0 (run.yaml)\n"
    assert not (tmp_path / "runs").exists()


def test_the_default_is_ten_minutes():
    assert parse_config(run_config(REPO / "x.csv", REPO / "out", REPO / "runs"), "t").train.collective_timeout_s == 600


PAIR = textwrap.dedent("""
    import datetime, sys, time
    import torch, torch.distributed as dist
    from stoker.trainer.hangs import bounded_collectives

    rank = int(sys.argv[1])
    # The world group's own timeout is long, as if Ray had set none: what bounds the group below
    # is bounded_collectives, which DeepSpeed's groups (created so, without a timeout) rely on.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        with bounded_collectives(2.0):
            group = dist.new_group(ranks=[0, 1])  # as deepspeed.utils.groups clones the world group
            dist.all_reduce(torch.ones(1), group=group)
            started = time.monotonic()
            if rank == 1:
                print("pid", __import__("os").getpid(), flush=True)
                time.sleep(6)  # hung: never reaches the next all-reduce in time
            dist.all_reduce(torch.ones(1), group=group)
    except Exception as error:
        print(type(error).__name__, "|", str(error).splitlines()[0], "|", round(time.monotonic() - started), flush=True)
""")


def test_a_timed_out_collective_names_the_rank_that_did_not_arrive():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", PAIR, str(rank)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    (rank0, err0), (rank1, _) = (p.communicate(timeout=120) for p in procs)
    pid = re.search(r"pid (\d+)", rank1).group(1)
    found = re.fullmatch(r"CollectiveTimeout \| a collective did not complete within 2 s \(train.collective_timeout_s\): "
                         rf"rank 1 \(node [\d.]+, pid {pid}\) did not arrive \| (\d+)\n", rank0)
    assert found, rank0 + err0[-2000:]
    # 2 s for the all-reduce and 2 s for the roll call, not the world group's 120 s nor rank 1's 6 s.
    assert int(found.group(1)) < 6


# ---- A real run -----------------------------------------------------------------------------

HANG_TRAIN = {"epochs": 3, "batch_size": 8, "seed": 7, "optimizer": {"name": "adamw", "lr": 0.002},
              "deepspeed": {"zero_stage": 2}, "max_failures": 1, "collective_timeout_s": 8}


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_hung_worker_fails_the_attempt_naming_it_and_the_run_resumes_from_its_checkpoint(
        ray_cluster, prepared, tmp_path, capsys):
    from stoker.trainer.run import train

    config = dict(prepared, name="hung", storage=str(tmp_path / "runs"))
    config["train"] = {**prepared["train"], **HANG_TRAIN}
    run = parse_config(config, "test")
    run_dir = tmp_path / "runs" / "hung"
    frozen: dict = {}

    def freeze_in_epoch_1():
        while not lines(run_dir / "metrics.jsonl"):
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 1's training steps
        workers = train_workers()
        worker = workers[-1]
        frozen["pid"], frozen["at"] = worker.pid, time.monotonic()
        os.kill(worker.pid, signal.SIGSTOP)  # hung: alive, holding its place in every collective
        try:
            while not lines(run_dir / "events.jsonl") and time.monotonic() - frozen["at"] < 90:
                time.sleep(0.1)
            frozen["failed_after"] = time.monotonic() - frozen["at"]
        finally:
            os.kill(worker.pid, signal.SIGCONT)  # it recovers; Ray then ends the old worker group

    freezer = threading.Thread(target=freeze_in_epoch_1, daemon=True)
    freezer.start()
    capsys.readouterr()
    train(run)
    freezer.join(timeout=5)
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("stoker: worker rank")]
    assert len(said) == 1, err[-3000:]
    found = re.fullmatch(
        r"stoker: worker rank (\d) failed \(a collective did not complete within 8 s \(train.collective_timeout_s\): "
        rf"rank (\d) \(node [\d.]+, pid {frozen['pid']}\) did not arrive\); restarting the workers from epoch "
        r"(\d)'s checkpoint, attempt 1 of 1 \(train.max_failures\)", said[0])
    assert found and found.group(1) != found.group(2), said[0]
    # The collective timeout and the roll call, not Ray's 10-minute health check.
    assert frozen["failed_after"] < 8 + 8 + 10, frozen
    records = lines(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all("stragglers" not in r for r in records)
    events = lines(run_dir / "events.jsonl")
    assert len(events) == 1 and events[0]["ranks"] == [int(found.group(1))]
