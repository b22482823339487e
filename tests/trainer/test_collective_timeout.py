"""train.collective_timeout_s: a bad value is refused naming the key; a collective that does not
complete in time fails with one line naming the rank that did not arrive (two real gloo
processes, no Ray). On a real run (a worker frozen with SIGSTOP) the attempt fails that way and
the run resumes from its checkpoint: tests/trainer/test_trainer_e2e.py's
test_a_hung_then_a_killed_worker_change_nothing."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from stoker.config import parse_config
from stoker.errors import UserError
from tests.conftest import REPO, run_cli, run_config, write_config
from tests.ports import free_port


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
    port = free_port()
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
