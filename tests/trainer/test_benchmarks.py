"""The throughput benchmarks as a user runs them (real subprocesses): bad flags exit 2 with
one line naming the flag and what it takes, and the limit side of train_throughput.py (plain
DDP and plain DeepSpeed, no Ray) trains every training row and accounts for its pass.
Figures are never asserted here: they are the benchmarks' output, not a test's."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "benchmarks"


def bench(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize(("script", "flag", "value", "takes"), [
    ("train_throughput.py", "--rows", "0", ">= 1024"),
    ("train_throughput.py", "--stages", "0,4", "0,1,2,3"),
    ("train_throughput.py", "--sides", "stoker,fast", "stoker,raw,limit"),
    ("epoch_overhead.py", "--repeats", "0", ">= 1"),
    ("prepare_scale.py", "--sizes", "1000000,0", ">= 1000"),
])
def test_a_bad_flag_exits_2_with_one_line_naming_it(script, flag, value, takes):
    result = bench(script, flag, value)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and not result.stdout, result.stderr
    assert f"argument {flag}:" in lines[0] and takes in lines[0] and repr(value) in lines[0], lines[0]


@pytest.mark.slow
def test_the_limit_side_trains_every_training_row_and_accounts_for_its_pass():
    # Smallest settings: ~1,000 training rows, ZeRO 0 and 3 (the plain DDP limit always runs).
    result = bench("train_throughput.py", "--rows", "1024", "--stages", "0,3", "--sides", "limit", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    rows = out["rows"]
    assert 1024 <= rows < 1100  # the prepared training split the flag asked for
    whole = rows - rows % out["workers"]  # Ray's equal split, which stoker's workers get
    limits = [out["ddp_limit"], *({"rows": out[s]["limit_rows"], "epoch_s": out[s]["limit_epoch_s"],
                                   "samples_per_s": out[s]["limit_samples_per_s"],
                                   "breakdown": out[s]["limit_breakdown"]} for s in ("zero0", "zero3"))]
    for limit in limits:
        assert limit["rows"] == whole, limit
        assert limit["samples_per_s"] == pytest.approx(whole / limit["epoch_s"], rel=0.01), limit
        parts = limit["breakdown"]
        assert parts["compute_s"] > 0 and parts["step_s"] > 0 and parts["wait_s"] == 0, limit  # data in memory
        assert sum(parts.values()) == pytest.approx(limit["epoch_s"], rel=0.05), limit
    # Keys that need a side that did not run are left out, not made up.
    assert "ratio" not in out["zero0"] and "over_limit" not in out["zero0"] and "ddp" not in out


def test_epoch_overhead_splits_each_gap_into_parts_that_sum_to_it(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from epoch_overhead import fixed_per_epoch

    stamps = [100.0, 101.0, 101.8]  # epoch 0's report opens the first gap: it is not one
    records = [{"epoch_time_s": 9.0}, {"epoch_time_s": 0.5, "validation_s": 0.2, "checkpoint_s": 0.1},
               {"epoch_time_s": 0.5, "validation_s": 0.1}]  # no checkpoint that epoch
    parts = fixed_per_epoch(stamps, records)
    assert parts["gap_s"] == pytest.approx(0.9) and parts["pass_s"] == pytest.approx(0.5)
    assert parts["checkpoint_s"] == pytest.approx(0.05) and parts["report_s"] == pytest.approx(0.2)
    assert parts["pass_s"] + parts["validation_s"] + parts["checkpoint_s"] + parts["report_s"] == pytest.approx(
        parts["gap_s"])
