"""Many runs, one registry: N concurrent writer processes (1, 2, 4, 8 by default) against one
runs registry, each recording runs the way `stoker train` does (a "running" write when the run
starts, a "succeeded" write with its metrics when it ends), all released at the same moment.

Prints one JSON line. Section `registry`, for each N: the latency of one registry write (one
`Registry.upsert_run` transaction, as seen by the writer, lock waits included) at p50/p99 in
ms, the time to open the registry (at N > 1 with the default SQLite, a fresh file whose schema
the N writers race to create), writes per second over all writers, and `runs_lost` (runs a
writer that exited 0 recorded and the registry does not hold as succeeded with that writer's
metrics: must be 0), plus `writer_failures` (writer processes that exited non-zero, the first
one's last line as `first_error`: must be 0). `cpus` and `load_1m` (the 1-minute load average
before and after) say how busy the machine was: a lock holder that the kernel deschedules
holds every waiter up, so p99 on a loaded machine is mostly its load.

SQLite by default, a fresh file per N in a temporary directory; `--url` for another database
(PostgreSQL: `postgresql+psycopg://user@host/db`), shared by every N (each N's run ids are its
own). Sections are functions that take the parsed flags and return a dict.

Section `trainings` (`--trainings 1,2,4,8`; `--trainings 0` skips it): for each N, N `stoker
train` processes of N different digits runs (2 epochs, one small worker each) start at once on
a fresh storage and registry, with one more start of the first run beside them, all joining one
local Ray cluster (as trainings on a shared cluster do), after one uncounted warm-up run
(`warmup_s`). Keys per N: `wall_s`, `over_n_single` (wall at N over N times the wall of one
run alone: under 1 when runs overlap), `runs_lost`
(distinct runs not recorded once as succeeded with each epoch logged once, in order: must be 0)
and `duplicates_admitted` (a second start of a live run that was not refused: must be 0).

    .venv/bin/python benchmarks/concurrency.py [--writers 1,2,4,8] [--runs 25] [--url URL]
                                               [--trainings 1,2,4,8]
"""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flags import OneLineParser, int_list, positive_int  # benchmarks/flags.py

from stoker.cluster.registry import Registry, redact
from stoker.errors import UserError

# A writer: imports (and its database driver) before the barrier, so the N writers start
# together; then opens the registry and records its runs, timing each write.
WRITER = r"""
import json, os, sys, time
from pathlib import Path
from sqlalchemy.engine import make_url
from stoker.cluster.registry import Registry

url, barrier, prefix, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
make_url(url).get_dialect().import_dbapi()
(barrier / f"ready-{prefix}").touch()
while not (barrier / "go").exists():
    time.sleep(0.001)
released = time.time()
started = time.perf_counter()
registry = Registry(url)
open_s = time.perf_counter() - started
writes = []
for i in range(runs):
    run_id = f"{prefix}r{i:04d}"
    for fields in ({"name": f"bench-{prefix}", "status": "running"},
                   {"status": "succeeded", "metrics": {"writer": prefix, "run": i}}):
        t = time.perf_counter()
        registry.upsert_run(run_id, **fields)
        writes.append(time.perf_counter() - t)
registry.close()
print(json.dumps({"open_s": open_s, "writes_s": writes, "released": released, "ended": time.time()}))
"""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, not an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def race(url: str, barrier: Path, count: int, runs: int, tag: str, timeout: float = 600) -> list[dict]:
    """`count` writer processes released together; each one's report (or its failure)."""
    barrier.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    prefixes = [f"{tag}w{i}" for i in range(count)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(barrier), prefix, str(runs)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for prefix in prefixes]
    while len(list(barrier.glob("ready-*"))) < count and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    (barrier / "go").touch()
    reports = []
    for prefix, proc in zip(prefixes, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode == 0:
            reports.append({"prefix": prefix, **json.loads(out)})
        else:
            last = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
            reports.append({"prefix": prefix, "error": last})
    return reports


def registry_section(args: argparse.Namespace, work: Path) -> dict:
    run_tag = f"{os.getpid():x}{int(time.time()) % 100000:x}"  # distinct ids on a shared --url
    result: dict = {"writers": args.writers, "runs_per_writer": args.runs, "writes_per_run": 2,
                    "write_ms": {}, "open_ms": {}, "writes_per_s": {}, "runs_lost": 0, "writer_failures": 0}
    errors = []
    for count in args.writers:
        url = args.url or f"sqlite:///{work / f'n{count}' / 'registry.db'}"
        tag = f"{run_tag}n{count}"
        started = time.perf_counter()
        reports = race(url, work / f"barrier-n{count}", count, args.runs, tag)
        wall = time.perf_counter() - started
        good = [r for r in reports if "error" not in r]
        errors += [r["error"] for r in reports if "error" in r]
        writes = [w for r in good for w in r["writes_s"]]
        registry = Registry(url)
        held = {(r.id, json.dumps(r.metrics, sort_keys=True)) for r in registry.runs(status="succeeded")
                if r.id.startswith(tag)}
        registry.close()
        expected = {(f"{r['prefix']}r{i:04d}", json.dumps({"run": i, "writer": r["prefix"]}, sort_keys=True))
                    for r in good for i in range(args.runs)}
        key = str(count)
        result["runs_lost"] += len(expected - held)
        result["writer_failures"] += len(reports) - len(good)
        if writes:
            result["write_ms"][key] = {"p50": ms(percentile(writes, 50)), "p99": ms(percentile(writes, 99))}
            opens = [r["open_s"] for r in good]
            result["open_ms"][key] = {"p50": ms(percentile(opens, 50)), "max": ms(max(opens))}
            span = max(r["ended"] for r in good) - min(r["released"] for r in good)
            result["writes_per_s"][key] = round(len(writes) / span, 1)
        result.setdefault("wall_s", {})[key] = round(wall, 2)
    if errors:
        result["first_error"] = errors[0]
    return result


def trainings_section(args: argparse.Namespace, work: Path) -> dict:
    """N concurrent `stoker train` processes (and one duplicate start) per N; see the docstring."""
    import ray
    import yaml

    from stoker.cluster.connect import connect_embedded
    from stoker.trainer.run_dir import Records

    project = work / "trainings"
    project.mkdir()
    from sklearn.datasets import load_digits

    load_digits(as_frame=True).frame.to_csv(project / "digits.csv", index=False)
    base = {"name": "base", "storage": "runs",
            "data": {"source": "digits.csv", "label": "target", "output": "prepared"},
            "model": {"name": "mlp", "hidden": [64]}, "train": {"epochs": 2, "batch_size": 32}}
    (project / "base.yaml").write_text(yaml.safe_dump(base))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    subprocess.run([sys.executable, "-m", "stoker", "data", "prepare", "base.yaml"], cwd=project, env=env,
                   check=True, capture_output=True)
    connect_embedded()
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    result: dict = {"trainings": args.trainings, "wall_s": {}, "over_n_single": {}, "runs_lost": 0,
                    "duplicates_admitted": 0}

    def start(tag: str, names: list[str], starts: list[str]) -> tuple[list[tuple[int, str]], float]:
        """`stoker train` of each of `starts` at once (configs of `names`): outcomes, wall."""
        # Workers that leave half the CPUs to the Ray Data readers of all the runs.
        cpus = round((os.cpu_count() or 2) / (2 * len(names)), 3)
        for name in names:
            config = {**base, "name": name, "storage": f"runs-{tag}",
                      "scaling": {"num_workers": 1, "cpus_per_worker": cpus}}
            (project / f"{name}.yaml").write_text(yaml.safe_dump(config))
        started = time.perf_counter()
        logs = [project / f"{tag}-start{i}.log" for i in range(len(starts))]
        procs = []
        for name, log in zip(starts, logs, strict=True):
            with open(log, "w") as sink:  # a file, not a pipe: Ray's lines never block a start
                procs.append(subprocess.Popen([sys.executable, "-m", "stoker", "train", f"{name}.yaml"],
                                              cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT))
        outcomes = [(p.wait(timeout=1800), log.read_text()) for p, log in zip(procs, logs, strict=True)]
        return outcomes, time.perf_counter() - started

    single = None
    try:
        # One run first, not counted: the first training on a new cluster also pays for Ray's
        # first worker processes and cold imports, which would flatter every N against N=1.
        [(code, log)], warmup = start("warmup", ["warmup"], ["warmup"])
        if code != 0:
            raise RuntimeError(f"the warm-up training failed: {log.strip().splitlines()[-1:]}")
        result["warmup_s"] = round(warmup, 1)
        for count in sorted(args.trainings):
            storage = f"runs-n{count}"
            names = [f"n{count}-r{i}" for i in range(count)]
            starts = [*names, names[0]]  # the last: a second driver of a live run
            outcomes, wall = start(f"n{count}", names, starts)
            # The two starts of the first run: one trains, the other is refused (or, come up after
            # the first ended, finds it finished); whichever of them won the lease.
            trained = [code == 0 and "already finished" not in err
                       for (code, err), name in zip(outcomes, starts, strict=True) if name == names[0]]
            result["duplicates_admitted"] += max(0, sum(trained) - 1)
            registry = Registry(f"sqlite:///{project / storage / 'registry.db'}")
            recorded = {r.name: r for r in registry.runs()}
            registry.close()
            for name in names:
                epochs = [m["epoch"] for m in Records(project / storage / name).metrics()]
                record = recorded.get(name)
                if record is None or record.status != "succeeded" or epochs != [0, 1]:
                    result["runs_lost"] += 1
            single = single if count != 1 else wall
            result["wall_s"][str(count)] = round(wall, 1)
            if single:
                result["over_n_single"][str(count)] = round(wall / (count * single), 3)
    finally:
        ray.shutdown()
    return result


def main() -> int:
    parser = OneLineParser(prog="benchmarks/concurrency.py", description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int_list(1), default=[1, 2, 4, 8],
                        help="numbers of concurrent writer processes, comma-separated (default 1,2,4,8)")
    parser.add_argument("--runs", type=positive_int, default=25, help="runs each writer records (2 writes each)")
    parser.add_argument("--url", help="registry URL (default: a fresh SQLite file per N in a temporary directory)")
    parser.add_argument("--trainings", type=int_list(0), default=[1, 2, 4, 8],
                        help="numbers of concurrent `stoker train` processes, comma-separated (0: skip)")
    args = parser.parse_args()
    if args.url:
        try:
            Registry(args.url).close()
        except UserError as exc:
            parser.error(f"argument --url: {str(exc).removeprefix('cluster.registry.url: ')}")
        backend = args.url.split(":", 1)[0].split("+", 1)[0]
    else:
        backend = "sqlite"
    # Latencies on a shared machine are mostly its load (a lock holder descheduled): said beside them.
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stoker-concurrency-") as work:
        result = {
            "backend": backend,
            "url": redact(args.url) if args.url else "sqlite (fresh file per N)",
            "registry": registry_section(args, Path(work)),
        }
        args.trainings = [n for n in args.trainings if n > 0]
        if args.trainings:
            # The driver prints the raylet's warnings to stdout (after stoker's own redirect of
            # Ray's printer, too): stdout is the JSON line's alone, as in `stoker train`.
            with contextlib.redirect_stdout(sys.stderr):
                result["trainings"] = trainings_section(args, Path(work))
    result["cpus"] = os.cpu_count()
    result["load_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]  # before, after
    print(json.dumps(result))
    trainings = result.get("trainings", {})
    failed = (result["registry"]["runs_lost"] or result["registry"]["writer_failures"]
              or trainings.get("runs_lost") or trainings.get("duplicates_admitted"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
