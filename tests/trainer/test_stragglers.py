"""Stragglers: the rule (a rank 1.3x the median of the others for a minute) on its own, and the
watch on two real gloo processes, one of which has a slower forward pass."""

import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from stoker.trainer.stragglers import SLOW_FOR_S, SLOW_RATIO, Straggler, StragglerDetector
from tests.conftest import REPO


def feed(detector, samples, every=5.0):
    """Samples `every` seconds apart; returns what was named at each."""
    return [detector.add(i * every, (i + 1) * every, seconds) for i, seconds in enumerate(samples)]


def test_the_rule_is_the_issues():
    assert (SLOW_RATIO, SLOW_FOR_S) == (1.3, 60.0)


def test_a_rank_slow_for_a_minute_is_named_once_with_its_ratio_and_span():
    detector = StragglerDetector()
    # Four ranks; rank 2 takes 1.5x the others' median for 13 samples of 5 s (65 s).
    named = feed(detector, [[1.0, 1.1, 1.5, 0.9]] * 13)
    assert named[:11] == [[]] * 11  # 55 s: not yet a minute
    assert named[11] == [Straggler(rank=2, ratio=pytest.approx(1.5), span_s=60.0)]
    assert named[12] == []  # named once per slow stretch
    assert detector.slow() == [2]
    assert named[11][0].line("rank 2 (node 10.0.0.3, pid 77)") == (
        "stoker: rank 2 (node 10.0.0.3, pid 77) is a straggler: its steps took 1.50x the median over the last 60 s")


def test_a_break_in_the_stretch_starts_the_minute_again_and_a_new_stretch_is_named_again():
    detector = StragglerDetector()
    slow, normal = [1.0, 1.4], [1.0, 1.0]
    named = feed(detector, [slow] * 11 + [normal] + [slow] * 12 + [normal] + [slow] * 12)
    assert [(i, [s.rank for s in n]) for i, n in enumerate(named) if n] == [(23, [1]), (36, [1])]
    assert detector.slow() == [1]


def test_below_the_ratio_or_equal_ranks_name_nobody():
    detector = StragglerDetector()
    assert not any(feed(detector, [[1.0, 1.29]] * 30))  # 1.29x: under the rule
    assert not any(feed(detector, [[1.0, 1.0, 1.0]] * 30))
    assert not any(feed(detector, [[0.0, 0.0]] * 30))  # nothing measured yet: no median to compare
    assert detector.slow() == []


def test_with_two_ranks_the_median_is_the_other_rank_and_only_the_slow_one_is_named():
    named = feed(StragglerDetector(), [[2.0, 2.7]] * 13)
    assert [s.rank for n in named for s in n] == [1]
    assert named[11][0].ratio == pytest.approx(2.7 / 2.0)


def test_the_ratio_is_over_the_stretch_not_the_last_sample():
    named = feed(StragglerDetector(for_s=10), [[1.0, 1.4], [1.0, 2.0]])
    assert named[1] == [Straggler(rank=1, ratio=pytest.approx(1.7), span_s=10.0)]


WATCH = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from stoker.trainer.stragglers import StragglerDetector, StragglerWatch

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))

    class Slow(torch.nn.Linear):
        def forward(self, x):
            if rank == 1:
                time.sleep(0.004)  # rank 1's forward takes ~4 ms more: its own share of the step
            return super().forward(x)

    model = Slow(8, 8)
    watch = StragglerWatch(model, rank, 2, torch.device("cpu"), lambda r: f"rank {r} (node test)", every=10)
    if watch.detector is not None:
        watch.detector = StragglerDetector(for_s=1.0)  # the rule's minute, shortened for the test
    for step in range(int(sys.argv[2])):
        loss = model(torch.ones(4, 8)).sum()
        loss.backward()
        grad = model.weight.grad.clone()
        dist.all_reduce(grad)  # as DeepSpeed's backward: the fast rank waits for the slow one here
        model.weight.grad = None
        watch.stepped()
    with torch.no_grad():
        model.eval()
        model(torch.ones(4, 8))  # evaluation forwards are not counted
    print("epoch", watch.take_epoch(), flush=True)
    dist.destroy_process_group()
""")


def run_pair(steps: int) -> list[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WATCH, str(rank), str(steps)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [o[0] for o in outs]


def test_the_watch_names_the_rank_whose_forward_is_slower_though_both_step_at_the_same_pace():
    rank0, rank1 = run_pair(steps=400)
    named = [line for line in rank0.splitlines() if "straggler" in line]
    assert len(named) == 1, rank0
    found = re.fullmatch(r"stoker: rank 1 \(node test\) is a straggler: its steps took ([\d.]+)x the median "
                         r"over the last (\d+) s", named[0])
    assert found and float(found.group(1)) >= 1.3 and int(found.group(2)) >= 1, named[0]
    assert "epoch [1]" in rank0
    assert "straggler" not in rank1 and "epoch []" in rank1  # rank 0 alone names them
