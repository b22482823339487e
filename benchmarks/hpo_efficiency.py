"""HPO efficiency: ASHA + TPE vs random search without early stopping, same trial count and
seed, over real DeepSpeed trainings (MLP on scikit-learn's digits) on one local cluster.

Prints one JSON line: epochs_ratio (ASHA+TPE epochs / random epochs), metric_gap (relative
shortfall of ASHA+TPE's best validation accuracy vs random's; <= 0 when as good or better),
trial_epoch_over_pass (the random search's wall per trial-epoch, times the trials it runs at
once, over the mean training pass plus validation its trials measured (`pass_s`,
`validation_s`): what one epoch of a trial costs beyond its training; start-up, checkpoint,
report and Tune's bookkeeping are all on the wall side), split into trial_start_s (a trial's
first iteration: process, imports, DeepSpeed, first data) and later_epoch_over_pass (every
later epoch's wall in the trial over the pass plus validation),
and the raw figures (each search's wall and CPU seconds, the CPU summed over this process and
every process under it, Ray's workers included).

Defaults: 18 trials of up to 27 epochs, ASHA with grace period 1 and reduction factor 3 (rungs
at epochs 1, 3, 9 and 27), learning rate and width searched. One-worker trials run in-process.
Why 27: ASHA's saving grows with max_t / grace_period. At 9 epochs (three rungs) asynchronous
promotion, which lets the first trials at a rung through and keeps promoting TPE's improving
suggestions, spent 0.48 of random search's epochs; with a fourth rung it spends about 0.24.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from processes import tree_cpu_s  # benchmarks/processes.py

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from stoker.cluster.connect import connect_embedded  # noqa: E402
from stoker.config import parse_config  # noqa: E402
from stoker.datasets.prepare import prepare  # noqa: E402
from stoker.tune.runner import search  # noqa: E402
from stoker.tune.search_log import events  # noqa: E402

CONCURRENT = 2  # trials at once: 2 one-worker trials of a quarter CPU leave a CPU to Ray Data


def config(root: Path, name: str, trials: int, epochs: int, searcher: str, scheduler: str, seed: int,
           reduction_factor: float) -> dict:
    return {
        "name": name, "storage": str(root / "runs"),
        "data": {"source": str(root / "digits.csv"), "label": "target", "output": str(root / "prepared")},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": epochs, "batch_size": 64, "deepspeed": {"zero_stage": 1}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.25, "data_cpus": 1},
        "tune": {
            "num_samples": trials, "max_concurrent_trials": CONCURRENT, "searcher": searcher, "seed": seed,
            "scheduler": {"name": scheduler, "grace_period": 1, "reduction_factor": reduction_factor},
            "space": {
                "train.optimizer.lr": {"dist": "loguniform", "low": 1e-5, "high": 0.1},
                "model.hidden": {"dist": "choice", "values": [[16], [32], [64]]},
            },
        },
    }


def trial_iterations(experiment: Path) -> tuple[list[float], list[float]]:
    """Each trial's first iteration (its start-up: process, imports, DeepSpeed, first data,
    plus the first epoch) and every later iteration's seconds, from the search log's times as
    the driver saw them: from the trial's start to its first result, and between results."""
    firsts, laters = [], []
    last: dict[str, float] = {}
    for event in events(experiment):
        trial, kind = event.get("trial"), event["event"]
        if kind == "start" and trial not in last:
            last[trial] = event["t"]
        elif kind == "result" and trial in last:
            (laters if event["epoch"] > 1 else firsts).append(event["t"] - last[trial])
            last[trial] = event["t"]
    return firsts, laters


def training_passes(experiment: Path) -> tuple[list[float], list[float]]:
    """Every trial-epoch's training pass and validation in seconds, as its Train loop measured
    them (each trial's Train run records, `trials/<trial>/metrics.jsonl`)."""
    passes, validations = [], []
    for records in (experiment / "trials").glob("*/metrics.jsonl"):
        for line in records.read_text().splitlines():
            result = json.loads(line)
            if result.get("epoch_time_s"):
                passes.append(float(result["epoch_time_s"]))
                validations.append(float(result.get("validation_s", 0.0)))
    return passes, validations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=18)
    parser.add_argument("--epochs", type=int, default=27)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduction-factor", type=float, default=3)
    args = parser.parse_args()
    # Ray's driver copies raylet and worker warnings to stdout; the JSON line is the only stdout.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from sklearn.datasets import load_digits

    connect_embedded(num_cpus=2)
    figures = {}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        load_digits(as_frame=True).frame.to_csv(root / "digits.csv", index=False)
        for label, searcher, scheduler in (("random", "random", "fifo"), ("asha_tpe", "tpe", "asha")):
            run = parse_config(config(root, label, args.trials, args.epochs, searcher, scheduler, args.seed,
                                    args.reduction_factor), "bench")
            if label == "random":
                prepare(run.data)
            started, cpu = time.perf_counter(), tree_cpu_s()
            outcome = search(run, emit=lambda _: None)
            table = outcome.table
            figures[label] = {"best": float(table["val_accuracy"].max()), "epochs": int(table["epochs"].sum()),
                              "seconds": round(time.perf_counter() - started, 1),
                              "cpu_s": round(tree_cpu_s() - cpu, 1), "passes": training_passes(outcome.path),
                              "iterations": trial_iterations(outcome.path)}
    random_best, asha_best = figures["random"]["best"], figures["asha_tpe"]["best"]
    plain = figures["random"]
    per_trial_epoch = plain["seconds"] * CONCURRENT / plain["epochs"]
    passes, validations = plain["passes"]
    pass_s, validation_s = statistics.mean(passes), statistics.mean(validations)
    print(json.dumps({
        "benchmark": "hpo_efficiency", "trials": args.trials, "max_epochs": args.epochs,
        "reduction_factor": args.reduction_factor,
        "epochs_ratio": round(figures["asha_tpe"]["epochs"] / figures["random"]["epochs"], 3),
        "metric_gap": round((random_best - asha_best) / random_best, 4),
        "random_best": round(random_best, 4), "asha_tpe_best": round(asha_best, 4),
        "random_epochs": figures["random"]["epochs"], "asha_tpe_epochs": figures["asha_tpe"]["epochs"],
        "random_s": figures["random"]["seconds"], "asha_tpe_s": figures["asha_tpe"]["seconds"],
        "random_cpu_s": plain["cpu_s"], "asha_tpe_cpu_s": figures["asha_tpe"]["cpu_s"],
        "trial_epoch_s": round(per_trial_epoch, 3), "pass_s": round(pass_s, 3), "validation_s": round(validation_s, 3),
        "trial_epoch_over_pass": round(per_trial_epoch / (pass_s + validation_s), 2),
        # Where a trial-epoch's wall goes: a trial's start-up (its first iteration) against the
        # epochs after it (validation, checkpoint and report included) over the training pass.
        "trial_start_s": round(statistics.mean(plain["iterations"][0]), 2),
        "later_epoch_over_pass": (round(statistics.mean(plain["iterations"][1]) / (pass_s + validation_s), 2)
                                  if plain["iterations"][1] else None),
    }), file=json_out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
