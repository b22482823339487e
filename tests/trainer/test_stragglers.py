"""Stragglers: the rule (a rank 1.3x the median of the others over a minute) on its own, and the
watch on two real gloo processes, one of which has a slower forward pass."""

import os
import re
import statistics
import subprocess
import sys
import textwrap

import pytest

from stoker.trainer.stragglers import (
    SLOW_FOR_S,
    SLOW_RATIO,
    Straggler,
    StragglerDetector,
    medians_of_others,
)
from tests.conftest import REPO
from tests.ports import free_port


def feed(detector, samples, every=5.0, first=0):
    """Samples `every` seconds apart, the first one the `first`-th; returns what was named at each."""
    return [detector.add(i * every, (i + 1) * every, seconds) for i, seconds in enumerate(samples, start=first)]


def test_the_median_of_the_others_is_statistics_median_without_the_rank():
    for values in ([3.0], [1.0, 2.0], [5.0, 1.0, 3.0], [4.0, 4.0, 1.0, 9.0, 2.0], [0.5, 7.0, 7.0, 2.0, 3.0, 1.0]):
        expected = [statistics.median(values[:r] + values[r + 1:]) if len(values) > 1 else 0.0
                    for r in range(len(values))]
        assert medians_of_others(values) == expected, values


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
        "rank 2 (node 10.0.0.3, pid 77) is a straggler: its steps took 1.50x the median over the last 60 s")


def test_a_short_normal_spell_keeps_the_name_a_recovery_clears_it_and_a_new_slowdown_names_it_again():
    detector = StragglerDetector()
    slow, normal = [1.0, 1.6], [1.0, 1.0]
    named = feed(detector, [slow] * 12 + [normal] + [slow] * 3)
    assert [i for i, n in enumerate(named) if n] == [11]  # the minute's average stays slow
    assert detector.slow() == [1]
    assert not any(feed(detector, [normal] * 12, first=16)) and detector.slow() == []
    again = feed(detector, [slow] * 12, first=28)
    assert [s.rank for n in again for s in n] == [1] and detector.slow() == [1]


def test_a_rank_slowed_in_bursts_is_named_by_its_average_over_the_minute():
    # Two samples in three normal, one at 2.2x: no single stretch of slow samples, but its
    # steps took (1 + 1 + 2.2) / 3 = 1.4x the median over the minute.
    named = feed(StragglerDetector(), [[1.0, 1.0], [1.0, 1.0], [1.0, 2.2]] * 5)
    found = [s for n in named for s in n]
    assert [s.rank for s in found] == [1] and found[0].ratio == pytest.approx(1.4)


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
    ranks, notes = watch.take_epoch()
    print("epoch", ranks, flush=True)
    for note in notes:
        print("note", note, flush=True)
    dist.destroy_process_group()
""")


def run_pair(steps: int) -> list[str]:
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WATCH, str(rank), str(steps)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [o[0] for o in outs]


def test_the_watch_names_the_rank_whose_forward_is_slower_though_both_step_at_the_same_pace():
    rank0, rank1 = run_pair(steps=400)
    named = [line for line in rank0.splitlines() if line.startswith("note ")]
    assert len(named) == 1, rank0
    found = re.fullmatch(r"note rank 1 \(node test\) is a straggler: its steps took ([\d.]+)x the median "
                         r"over the last (\d+) s", named[0])
    assert found and float(found.group(1)) >= 1.3 and int(found.group(2)) >= 1, named[0]
    assert "epoch [1]" in rank0
    assert "note" not in rank1 and "epoch []" in rank1  # rank 0 alone names them


def test_rank_0s_lines_reach_the_run_output_once_through_the_epoch_record(tmp_path, capsys):
    """Workers' own output stays in Ray's logs (stoker train without --verbose), so a straggler
    line travels in the record: the driver's log keeps the ranks in metrics.jsonl, writes the
    line to events.jsonl once, and says it."""
    import json

    from stoker.trainer.run import _say_event
    from stoker.trainer.run_dir import Records
    from stoker.trainer.tracking import RunLog

    line = "rank 1 (node 10.0.0.7, pid 4242) is a straggler: its steps took 1.42x the median over the last 63 s"
    log = RunLog(Records(tmp_path))
    log.after_report(None, [{"epoch": 3, "stragglers": [1], "straggler_notes": [line]}], None)
    log.after_report(None, [{"epoch": 4, "stragglers": [1]}], None)  # still slow: listed, not said again
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [{"epoch": 3, "stragglers": [1]}, {"epoch": 4, "stragglers": [1]}]
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events == [{"event": "straggler", "epoch": 3, "line": line}]
    capsys.readouterr()
    _say_event(events[0])
    assert capsys.readouterr().err == f"stoker: {line}\n"
