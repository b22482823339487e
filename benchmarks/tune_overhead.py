"""Tune overhead: N trivial trials (sleep, report a few results) through stoker's tune runner
vs a raw Ray Tune script doing the same, on the same local cluster in the same run.

Prints one JSON line: over_min (stoker time / (trials x sleep / concurrency)), over_raw
(stoker time / raw Ray Tune time) and the raw figures. The default N is 100, not 500: on a
2-CPU machine shared with other work, 500 trials of each kind take well over ten minutes.
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
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the JSON line is the only stdout

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search import BasicVariantGenerator  # noqa: E402

from stoker.tune.progress import QuietProgress  # noqa: E402
from stoker.tune.runner import launch  # noqa: E402


def make_trainable(sleep_s: float, reports: int):
    def sleepy(config):
        for step in range(reports):
            time.sleep(sleep_s / reports)
            tune.report({"score": config["x"] * (step + 1)})
    return sleepy


def run_raw(trainable, storage: Path, n: int, concurrency: int, cpus: float) -> float:
    started = time.perf_counter()
    tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus}),
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=n, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="raw", storage_path=str(storage), verbose=0),
    ).fit()
    return time.perf_counter() - started


def run_stoker(trainable, storage: Path, n: int, concurrency: int, cpus: float) -> float:
    started = time.perf_counter()
    launch(trainable, path=storage / "stoker", space={"x": tune.uniform(0, 1)}, metric="score", mode="max",
           num_samples=n, max_concurrent=concurrency,
           searcher=BasicVariantGenerator(random_state=0, max_concurrent=concurrency),
           callbacks=[QuietProgress("score", "max", None, 30.0, lambda _: None)], resources={"cpu": cpus})
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--sleep", type=float, default=3.0, help="seconds each trial sleeps in all")
    parser.add_argument("--reports", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cpus = round(2 / args.concurrency, 3)
    trainable = make_trainable(args.sleep, args.reports)
    with tempfile.TemporaryDirectory() as directory:
        storage = Path(directory)
        run_raw(trainable, storage / "warm", args.concurrency, args.concurrency, cpus)  # start worker processes
        raw_s = run_raw(trainable, storage, args.trials, args.concurrency, cpus)
        stoker_s = run_stoker(trainable, storage, args.trials, args.concurrency, cpus)
    minimum = args.trials * args.sleep / args.concurrency
    print(json.dumps({
        "benchmark": "tune_overhead", "trials": args.trials, "sleep_s": args.sleep,
        "concurrency": args.concurrency, "min_s": round(minimum, 2), "stoker_s": round(stoker_s, 2),
        "raw_s": round(raw_s, 2), "over_min": round(stoker_s / minimum, 3), "over_raw": round(stoker_s / raw_s, 3),
    }))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
