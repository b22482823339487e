"""Tune overhead: N trivial trials (sleep, report a few results) through stoker's tune runner
vs a raw Ray Tune script doing the same, on the same local cluster in the same run.

Prints one JSON line: over_min (stoker time / (trials x sleep / concurrency)), over_raw
(stoker time / raw Ray Tune time), the raw figures, trial_processes (trial processes each side
started: concurrency is the fewest possible), and the driver's memory as trials finish:
driver_rss_mb (resident MiB when 25/50/75/100% of stoker's trials had finished) and
driver_growth_mb_per_1k_trials (growth from 25% to 100%, per 1,000 trials; raw Ray Tune's
beside it as raw_growth_mb_per_1k_trials). From 25%: the first trials pay for imports and
caches that do not grow with the trial count. At 2,000 trials or more also
driver_growth_mb_1k_to_<N>k (resident MiB at the last trial minus at the 1,000th), and always
end_of_search_s: from the last trial's end (the search log's time) to the results table,
importance and report written, as `stoker tune` writes them (stoker_s includes that end).

The settings are the ones a runtime would pick for many short one-process trials, and both
sides get the same ones, so over_raw compares like with like:
- 500 trials of 2 s each, 3 results per trial. Ray's own bookkeeping-overhead release test
  (`tune_tests/scalability_tests/workloads/test_bookkeeping_overhead.py`) runs 10,000 trials of
  1 s with one result per second on 16 CPUs and accepts 800 s against a 625 s minimum (1.28x).
  2 s is the shortest trial that still says something about per-trial bookkeeping on a 2-CPU
  machine shared with other work, where 1 s trials measure scheduling noise.
- Actors are reused between trials (Tune's `reuse_actors`, as in that release test): a new
  Ray worker process costs about a second here, half of a 2 s trial.
- Each trial reserves 2/concurrency CPUs (1/8 at the default 16), so 16 sleeping trials run
  at once on 2 CPUs instead of 2, and the searcher caps concurrency at 16 as stoker caps every
  search. (Capping by resources alone, as Ray's release test does, keeps trials pending and
  was slower here: 3.6x the minimum against 1.7x under the same load, with Tune staging
  placement groups for the pending trials.)
Where the two differ is what stoker's runner does for every search that reuses actors: Tune
hands a finished trial's actor to the oldest PENDING trial, which while the search starts up
is one whose own actor is already starting, and that actor is thrown away once it is up, a
wasted process start (about 1.2 s of CPU here) that delays the rest. stoker leaves PENDING
trials to the controller's own pass, which gives the actor to a trial that has none yet
(`stoker.tune.runner.StartingTrialsKeepTheirActors`): 16 processes for 16 slots instead of 36
at 96 trials. It also starts new trial processes two at a time (one per CPU,
`stoker.tune.staggered`), so the first trials run while the rest start, where all 16 asked for
at once come up together, late. What is left of the overhead is mostly that start-up: 16
processes of about 1.7 s of CPU each (Python, Ray, Tune) on 2 CPUs, busy for their first 13 s,
before all slots run, and the last trials' uneven ends.
Both searches run once before timing (a short warm-up) so neither pays for first imports.

suggest_p50_ms / suggest_p99_ms: how long stoker's TPE searcher (`tune.searcher: tpe`, built by
`stoker.tune.algorithms.build_searcher` with its bounded history, `tune.history_window`) takes to
suggest a trial's configuration once `--trials` trials have finished: over the last 500
suggestions, with `suggest_ms_at` giving p50/p99 at 1,000, 3,000 and 10,000 finished trials
(those the search reaches) and this process's resident memory then (`rss_mb`: what the
searcher's Optuna study holds grows with every trial and every reported result). It drives the searcher as Tune does (suggest, one result per
report, complete; `--concurrency` at a time) in this process, without Ray or trials, before the
searches above: the sleeping trials draw from a random searcher, and 10,000 real trials do not
fit a 2-CPU machine's time. A suggestion holds up Tune's whole event loop, so its p99 bounds
how often a large search stalls. `--suggest-only` measures only this (10,000 trials by default);
`--history-window` sets the window (a window larger than the trials is TPE on every trial).

What stoker adds over raw Tune is its callbacks (progress lines, best so far, the search log),
trial naming, its own experiment record and the results it writes at the end; what it leaves
out is Tune's per-trial loggers (tensorboardX, CSV, JSON: each Train run writes its own records
and TensorBoard events, and the search log holds every trial's curve), which the raw script
keeps as Tune's default.

`--dashboard` runs stoker's search once more with `stoker dashboard` serving it and a page open
on it (headless Chromium on the study page where installed): dashboard_overhead is that run's
time over the plain one's, less 1, and dashboard_cpu_s the CPU seconds the server (TensorBoard
included) and the page each used during it, which say where the overhead comes from.
"""

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.ports
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the JSON line is the only stdout

import psutil  # noqa: E402
import ray  # noqa: E402
from processes import tree_cpu_s  # noqa: E402 (benchmarks/processes.py)
from ray import tune  # noqa: E402
from ray.tune.search import BasicVariantGenerator  # noqa: E402

from stoker.tune.config import TuneConfig  # noqa: E402
from stoker.tune.progress import SearchProgressLog  # noqa: E402
from stoker.tune.runner import launch, summarise  # noqa: E402
from stoker.tune.search_log import SearchLog, events  # noqa: E402
from tests.ports import free_port  # noqa: E402


def make_trainable(sleep_s: float, reports: int):
    def sleepy(config):
        for step in range(reports):
            time.sleep(sleep_s / reports)
            # The process, so that the benchmark can count the trial processes each side started.
            tune.report({"score": config["x"] * (step + 1), "pid": os.getpid()})
    return sleepy


class SearchWatch(tune.Callback):
    """The driver's resident memory when 25, 50, 75 and 100% of `n` trials have finished, and
    the trial processes the search started (each is a process start: concurrency is the fewest
    possible)."""

    def __init__(self, n: int) -> None:
        self.marks = {max(1, round(n * q / 4)): q * 25 for q in (1, 2, 3, 4)}
        self.n, self.finished = n, 0
        self.at: dict[int, float] = {}  # finished trials -> resident MiB
        self.processes: set[int] = set()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.processes.add(result["pid"])

    def _count(self) -> None:
        self.finished += 1
        if self.finished in self.marks or self.finished in (1000, self.n):
            self.at[self.finished] = round(psutil.Process().memory_info().rss / 2**20, 1)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._count()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._count()

    @property
    def rss_mb(self) -> dict[int, float]:
        """Resident MiB when 25, 50, 75 and 100% of the trials had finished."""
        return {percent: self.at[count] for count, percent in self.marks.items() if count in self.at}

    def growth_from_1k(self, n: int) -> dict[str, float]:
        """`driver_growth_mb_1k_to_<n/1000>k`: resident MiB at the last trial minus at the 1,000th
        (a search of 2,000 trials or more)."""
        if 1000 not in self.at or n not in self.at or n < 2000:
            return {}
        return {f"driver_growth_mb_1k_to_{n // 1000}k": round(self.at[n] - self.at[1000], 1)}

    def growth_per_1k(self, n: int) -> float | None:
        if 25 not in self.rss_mb or 100 not in self.rss_mb:
            return None
        return round((self.rss_mb[100] - self.rss_mb[25]) / (0.75 * n) * 1000, 1)


def run_raw(trainable, storage: Path, n: int, concurrency: int, cpus: float, watch: SearchWatch | None = None) -> float:
    started = time.perf_counter()
    tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus}),
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=n, max_concurrent_trials=concurrency,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="raw", storage_path=str(storage), verbose=0,
                                  callbacks=[watch] if watch else None),
    ).fit()
    return time.perf_counter() - started


def run_stoker(trainable, storage: Path, n: int, concurrency: int, cpus: float, reports: int,
               watch: SearchWatch | None = None, name: str = "stoker") -> tuple[float, float]:
    """(seconds from launch to the search's results written, seconds of that after the last
    trial ended: `end_of_search_s`)."""
    started = time.perf_counter()
    path = storage / name
    path.mkdir(parents=True, exist_ok=True)
    space_cfg = TuneConfig.model_validate({"space": {"x": {"dist": "uniform", "low": 0, "high": 1}}, "searcher": "random"})
    results = launch(trainable, path=path, space={"x": tune.uniform(0, 1)}, metric="score", mode="max",
           num_samples=n, max_concurrent=concurrency,
           searcher=BasicVariantGenerator(random_state=0, max_concurrent=concurrency),
           # One-process trials, as stoker runs single-worker trials: no nested placement groups to sweep.
           # The callbacks every stoker search has: its progress and its trial log (the dashboard's).
           callbacks=[SearchProgressLog("score", "max", None, 30.0, lambda _: None),
                      SearchLog(path, space_cfg, "score", "max", reports),
                      *([watch] if watch else [])],
           resources={"cpu": cpus},
           reuse_actors=True)
    # What every search writes once its trials are over (results table, importance, report).
    summarise(results, space_cfg, "score", "max", reports, path)
    seconds = time.perf_counter() - started
    last_end = max(event["t"] for event in events(path, "end"))
    return seconds, time.time() - last_end


# A page open on the search while it runs: Chromium with optuna-dashboard's study page (its live
# update polls the server), or where no Chromium is installed the same requests from a loop.
WATCHER = r"""
import shutil, sys, time, urllib.request
port = sys.argv[1]
chromium = shutil.which("chromium")
if chromium:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        while True:
            try:
                page.goto(f"http://127.0.0.1:{port}/dashboard/studies/0")
                break
            except Exception:
                time.sleep(1)
        while True:
            page.wait_for_timeout(60000)
while True:
    for path in ("/api/studies/0", "/stoker/api/overview"):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read()
        except OSError:
            pass
    time.sleep(2)
"""


def run_with_dashboard(trainable, storage: Path, n: int, concurrency: int, cpus: float,
                       reports: int) -> tuple[float, bool, dict[str, float]]:
    """stoker's search again, with `stoker dashboard` serving its storage (TensorBoard too, as by
    default) and a page open on it; (seconds, whether the page was Chromium, CPU seconds the
    server and the page each used during the search: where the overhead comes from)."""
    import shutil
    import subprocess

    (storage / "dash").mkdir()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    # The dashboard refuses a storage with nothing in it: the search's folder with its state file.
    (storage / "dash" / "stoker").mkdir()
    (storage / "dash" / "stoker" / "stoker_experiment.json").write_text("{}")
    server = subprocess.Popen([sys.executable, "-m", "stoker", "dashboard", str(storage / "dash"), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(10)  # both up before the clock starts
        before = {"server": tree_cpu_s(server.pid), "page": tree_cpu_s(watcher.pid)}
        seconds = run_stoker(trainable, storage / "dash", n, concurrency, cpus, reports)[0]
        used = {"server": round(tree_cpu_s(server.pid) - before["server"], 1),
                "page": round(tree_cpu_s(watcher.pid) - before["page"], 1)}
        return seconds, shutil.which("chromium") is not None, used
    finally:
        for process in (watcher, server):
            process.terminate()
            process.wait(30)


# stoker's digits example's space (examples/tune-digits.yaml): two log-scaled floats, a float and
# a choice of layer widths (a choice of lists, which the searcher sees as JSON text).
SUGGEST_SPACE = {
    "train.optimizer.lr": {"dist": "loguniform", "low": 1.0e-4, "high": 0.05},
    "model.hidden": {"dist": "choice", "values": [[64], [128, 64], [256, 128]]},
    "model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.4},
    "train.optimizer.weight_decay": {"dist": "loguniform", "low": 1.0e-6, "high": 1.0e-2},
}
SUGGEST_MARKS = (1000, 3000, 10000)
SUGGEST_TAIL = 500  # suggestions each percentile is taken over


def made_up_accuracy(config: dict, rng: random.Random) -> float:
    """A smooth score with one optimum and noise, so that TPE's good/bad split means something."""
    lr, wd = config["train"]["optimizer"]["lr"], config["train"]["optimizer"]["weight_decay"]
    widths = json.loads(config["model"]["hidden"])
    return (0.97 - 0.05 * (math.log10(lr) + 2.5) ** 2 - 0.01 * (math.log10(wd) + 4) ** 2
            - 0.1 * (config["model"]["dropout"] - 0.15) ** 2 - 0.01 * len(widths) + rng.gauss(0, 0.005))


def _percentiles(latencies_ms: list[float]) -> dict[str, float]:
    tail = latencies_ms[-SUGGEST_TAIL:]
    return {"p50": round(statistics.median(tail), 2), "p99": round(statistics.quantiles(tail, n=100)[98], 2)}


def suggest_latency(trials: int, concurrency: int, reports: int, history_window: int | None) -> dict:
    """Per-suggestion milliseconds of stoker's TPE searcher as `trials` trials finish (see the
    module's docstring)."""
    from ray.tune.search import ConcurrencyLimiter

    from stoker.tune.algorithms import build_searcher
    from stoker.tune.config import TuneConfig
    from stoker.tune.space import nested_points, param_space

    tune_cfg = TuneConfig.model_validate({"space": SUGGEST_SPACE, "searcher": "tpe", "seed": 0, **(
        {"history_window": history_window} if history_window else {})})
    searcher = ConcurrencyLimiter(build_searcher(tune_cfg, nested_points(tune_cfg), concurrency), concurrency)
    searcher.set_search_properties("val_accuracy", "max", param_space(tune_cfg))
    rng, latencies, running, at = random.Random(0), [], deque(), {}
    for started in range(trials + concurrency):
        if started >= concurrency:  # the oldest trial finishes first, as same-length trials do
            trial_id, config = running.popleft()
            accuracy = made_up_accuracy(config, rng)
            for step in range(1, reports + 1):
                searcher.on_trial_result(trial_id, {"val_accuracy": accuracy, "training_iteration": step})
            searcher.on_trial_complete(trial_id, {"val_accuracy": accuracy, "training_iteration": reports})
            if started - concurrency + 1 in SUGGEST_MARKS:
                at[started - concurrency + 1] = {**_percentiles(latencies),
                                                 "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
        if started < trials:
            begun = time.perf_counter()
            running.append((f"t{started}", searcher.suggest(f"t{started}")))
            latencies.append((time.perf_counter() - begun) * 1000)
    last = _percentiles(latencies)
    return {"suggest_p50_ms": last["p50"], "suggest_p99_ms": last["p99"], "suggest_ms_at": at,
            "suggest_trials": trials, "history_window": tune_cfg.history_window}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None, help="default 500 (10,000 with --suggest-only)")
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each trial sleeps in all")
    parser.add_argument("--reports", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--suggest-only", action="store_true",
                        help="measure only the TPE searcher's suggestions, without Ray")
    parser.add_argument("--history-window", type=int, default=None,
                        help="tune.history_window of the TPE searcher (default: the config's default)")
    parser.add_argument("--stoker-only", action="store_true",
                        help="only stoker's search (no raw Ray Tune side, no suggestion timing): the 10,000-trial "
                             "targets (over_min, driver growth, end_of_search_s) in half the time")
    parser.add_argument("--dashboard", action="store_true",
                        help="also run stoker's search with `stoker dashboard` open on it (dashboard_overhead)")
    args = parser.parse_args()
    args.trials = args.trials or (10000 if args.suggest_only else 500)
    load = os.getloadavg()[0]
    suggest = {} if args.stoker_only else suggest_latency(args.trials, args.concurrency, args.reports,
                                                          args.history_window)
    if args.suggest_only:
        print(json.dumps({"benchmark": "tune_overhead", "concurrency": args.concurrency, **suggest,
                          "load_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}), flush=True)
        return 0
    # Ray's driver copies raylet and worker warnings to stdout; the JSON line is the only stdout.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cpus = round(2 / args.concurrency, 3)
    trainable = make_trainable(args.sleep, args.reports)
    with tempfile.TemporaryDirectory() as directory:
        storage = Path(directory)
        # Start the worker processes, and let both code paths import what they use.
        if not args.stoker_only:
            run_raw(trainable, storage / "warm", args.concurrency, args.concurrency, cpus)
        run_stoker(trainable, storage / "warm", args.concurrency, args.concurrency, cpus, args.reports)
        raw_watch, stoker_watch = SearchWatch(args.trials), SearchWatch(args.trials)
        raw_s = math.nan if args.stoker_only else run_raw(trainable, storage, args.trials, args.concurrency, cpus,
                                                          raw_watch)
        stoker_s, end_s = run_stoker(trainable, storage, args.trials, args.concurrency, cpus, args.reports,
                                     stoker_watch)
        dashboard = {}
        if args.dashboard:
            with_s, chromium, used = run_with_dashboard(trainable, storage, args.trials, args.concurrency, cpus,
                                                        args.reports)
            dashboard = {"stoker_with_dashboard_s": round(with_s, 2), "dashboard_cpu_s": used,
                         "dashboard_overhead": round(with_s / stoker_s - 1, 4),
                         "dashboard_page": "chromium" if chromium else "http polling"}
    minimum = args.trials * args.sleep / args.concurrency
    print(json.dumps({
        "benchmark": "tune_overhead", "trials": args.trials, "sleep_s": args.sleep,
        "concurrency": args.concurrency, "min_s": round(minimum, 2), "stoker_s": round(stoker_s, 2),
        "raw_s": None if args.stoker_only else round(raw_s, 2), "over_min": round(stoker_s / minimum, 3),
        "over_raw": None if args.stoker_only else round(stoker_s / raw_s, 3),
        "trial_processes": {"raw": len(raw_watch.processes), "stoker": len(stoker_watch.processes)},
        "driver_rss_mb": stoker_watch.rss_mb, "driver_growth_mb_per_1k_trials": stoker_watch.growth_per_1k(args.trials),
        **stoker_watch.growth_from_1k(args.trials), "end_of_search_s": round(end_s, 2),
        "raw_driver_rss_mb": raw_watch.rss_mb, "raw_growth_mb_per_1k_trials": raw_watch.growth_per_1k(args.trials),
        **suggest, **dashboard,
    }), file=json_out, flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
