"""Resuming at another world size and ZeRO stage: `resize_exact`.

Every case of tests/trainer/resize_cases.py's full matrix: a checkpoint saved by N ranks at
ZeRO stage s (stoker's MLP on the digits' shape, two AdamW steps with different batches per
rank) is resumed by M ranks at stage t the way a run resumes (the driver's
`checkpoint_resize.prepare`, then the workers' `loop._resume`), for N -> M in {1,2,3} x {1,2,3}
at ZeRO 0-3, plus ZeRO 1 -> 3 (2 -> 2 ranks), 3 -> 2 (3 -> 2), 0 -> 2 (2 -> 1) and 2 -> 0
(2 -> 3). A case is exact when every parameter's fp32 weights and Adam state (`exp_avg`,
`exp_avg_sq`), the optimizer's step and DeepSpeed's step counter, read back through
DeepSpeed's own accessors after the resume, are `torch.equal` to those read before the save.
CPU, gloo, one process per rank, no Ray.

Prints one JSON line: resize_exact (fraction of exact cases; must be 1.0), cases, failed
(the cases that were not, as [N, s, M, t]), seconds.

`--drain`: a node of a real two-node cluster drained mid-epoch with a 30 s deadline and lost
(tests/cluster/drain_scenario.py, an elastic digits run): `drain_lost_steps` (the drained
epoch's optimizer steps against the steps before its checkpoint plus the rest at the new
size: steps lost, or negative for steps trained twice; must be at most 1 either way) and
`recovery_over_startup` (from the node's loss to the first epoch on the node left, over the
run's own launch to first epoch; the issue asks for at most 1.2), with both times.

Not measured yet: resized_metric_gap, convert_over_save.

Usage: .venv/bin/python benchmarks/elastic.py [--drain]
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.trainer.resize_cases
os.environ.setdefault("TQDM_DISABLE", "1")


def drain() -> dict:
    from sklearn.datasets import load_digits

    from tests.cluster.drain_scenario import drained_run, steps_of_drained_epoch

    with tempfile.TemporaryDirectory() as out:
        source = Path(out) / "digits.csv"
        load_digits(as_frame=True).frame.to_csv(source, index=False)
        drained = drained_run(source, Path(out), epochs=30, deadline_s=30)
        if drained.code != 0:
            raise SystemExit(f"the drained run exited {drained.code}: {drained.stderr[-2000:]}")
        taken, expected = steps_of_drained_epoch(drained)
    return {"drain_lost_steps": expected - taken, "recovery_s": round(drained.recovery_s, 1),
            "startup_s": round(drained.startup_s, 1),
            "recovery_over_startup": round(drained.recovery_s / drained.startup_s, 3)}


def main() -> None:
    if "--drain" in sys.argv[1:]:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        print(json.dumps(drain()))
        return
    from tests.trainer.resize_cases import full_matrix, run_matrix

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = run_matrix(Path(out), full_matrix())
    failed = [r["case"] for r in results if not r["exact"]]
    print(json.dumps({"resize_exact": (len(results) - len(failed)) / len(results), "cases": len(results),
                      "failed": failed, "seconds": round(time.perf_counter() - started, 1)}), file=sys.__stdout__)


if __name__ == "__main__":
    main()
