"""Tune reuse: a small real search of single-worker (in-process) trials, with each trial's
process reused for the next trial (what `stoker tune` does) vs a new process per trial, on one
local cluster in the same run.

Prints one JSON line: reuse_s and fresh_s (wall time of each search, the best of the rounds),
ratio (reuse / fresh), processes (distinct trial pids of each) and the raw figures.

A new trial process imports torch, DeepSpeed and Ray Train before its first batch (seconds of
CPU each on a small machine); a reused one has them already. The searches alternate (fresh,
reuse, reuse, fresh, ...) so drift in the machine's load falls on both alike. The data is
prepared once, before timing, and a first short search warms the extension and file caches.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from stoker.cluster.connect import connect_embedded  # noqa: E402
from stoker.config import parse_config  # noqa: E402
from stoker.datasets.prepare import prepare  # noqa: E402
from stoker.tune.runner import search  # noqa: E402
from stoker.tune.search_log import events  # noqa: E402


def config(root: Path, name: str, trials: int, epochs: int) -> dict:
    return {
        "name": name, "storage": str(root / "runs"),
        "data": {"source": str(root / "digits.csv"), "label": "target", "output": str(root / "prepared")},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": epochs, "batch_size": 64, "deepspeed": {"zero_stage": 1}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.25, "data_cpus": 1},
        "tune": {
            "num_samples": trials, "max_concurrent_trials": 2, "searcher": "random", "seed": 0,
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.05}},
        },
    }


def timed_search(root: Path, name: str, trials: int, epochs: int, reuse: bool) -> tuple[float, int, float]:
    """(seconds, distinct trial processes, best validation accuracy)."""
    run = parse_config(config(root, name, trials, epochs), "bench")
    started = time.perf_counter()
    outcome = search(run, emit=lambda _: None, reuse_actors=None if reuse else False)
    seconds = time.perf_counter() - started
    pids = {end["pid"] for end in events(outcome.path, "end")}  # the process each trial ran in
    return seconds, len(pids), float(outcome.table["val_accuracy"].max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of searches (fresh+reuse, then reuse+fresh, ...)")
    args = parser.parse_args()
    # Ray's driver copies raylet and worker warnings to stdout; the JSON line is the only stdout.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from sklearn.datasets import load_digits

    connect_embedded(num_cpus=2)
    times: dict[str, list[float]] = {"fresh": [], "reuse": []}
    processes, best = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        load_digits(as_frame=True).frame.to_csv(root / "digits.csv", index=False)
        prepare(parse_config(config(root, "prepare", 1, 1), "bench").data)
        timed_search(root, "warm", 2, 1, reuse=True)
        for index in range(args.rounds):
            order = ("fresh", "reuse") if index % 2 == 0 else ("reuse", "fresh")
            for label in order:
                seconds, processes[label], best[label] = timed_search(
                    root, f"{label}-{index}", args.trials, args.epochs, reuse=label == "reuse")
                times[label].append(round(seconds, 2))
    reuse_s, fresh_s = min(times["reuse"]), min(times["fresh"])
    print(json.dumps({
        "benchmark": "tune_reuse", "trials": args.trials, "epochs": args.epochs, "concurrency": 2,
        "reuse_s": reuse_s, "fresh_s": fresh_s, "ratio": round(reuse_s / fresh_s, 3),
        "processes": processes, "best_val_accuracy": best, "rounds": times,
    }), file=json_out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
