"""Preparation at scale: does memory stay bounded and throughput hold as rows grow?

Synthetic data as `prepare.py`'s (64 float64 columns, 8 Parquet files) at each size. Per size
and engine: rows/s of `stoker.datasets.prepare.prepare` (run in a fresh subprocess; `ray`
starts an embedded 2-CPU cluster in it, before the clock), the pyarrow floor on the same files
(read every file and write it back out, no cleaning or transforms), and the peak memory of the
whole process tree (the subprocess and every descendant: Ray's raylet, GCS and workers), as the
sum of PSS sampled four times a second, so pages shared with the object store count once.
Each figure comes with the one-minute load average after it was taken (`load_1m`). Prints one
JSON line.

Usage: python benchmarks/prepare_scale.py [--sizes 1000000,4000000,16000000] [--engines local,ray]
16M rows is 8 GB of numbers (and as much disk); the 1M-to-16M ratios are only reported when
both sizes ran.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flags import OneLineParser, at_least, int_list, name_list  # noqa: E402
from prepare import synthetic  # noqa: E402

ENGINES = ("local", "ray")
# Fewer rows than this leave a split too small for 8 source files and three splits.
MIN_ROWS = 1000

_RUN = """
import json, os, sys, time
engine, source, output = sys.argv[1:4]
from stoker.datasets.config import DataConfig
from stoker.datasets.prepare import prepare
if engine == "ray":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from stoker.cluster.connect import connect_embedded
    connect_embedded(num_cpus=2)
started = time.perf_counter()
manifest = prepare(DataConfig(source=source, label="target", output=output, missing="mean", engine=engine))
seconds = time.perf_counter() - started
print(json.dumps({"s": seconds, "rows": sum(s["rows"] for s in manifest.splits.values()),
                  "split": manifest.report["split"]["method"]}))
if engine == "ray":
    import ray
    ray.shutdown()
"""


def tree_pss_mb(root: psutil.Process) -> float:
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total / 2**20


def run_prepare(engine: str, source: Path, output: Path) -> dict:
    process = subprocess.Popen([sys.executable, "-c", _RUN, engine, str(source), str(output)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss_mb(root))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"prepare ({engine}) failed: {err.strip().splitlines()[-1] if err.strip() else process.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"rows_per_s": round(result["rows"] / result["s"]), "s": round(result["s"], 2),
            "peak_mb": round(peak), "split": result["split"]}


def floor_rows_per_s(source: Path, scratch: Path, rows: int) -> int:
    scratch.mkdir()
    started = time.perf_counter()
    for path in sorted(source.iterdir()):
        pq.write_table(pq.read_table(path), scratch / path.name)
    seconds = time.perf_counter() - started
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    return round(rows / seconds)


def main() -> None:
    parser = OneLineParser(prog="benchmarks/prepare_scale.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int_list(minimum=MIN_ROWS), default=[1_000_000, 4_000_000, 16_000_000],
                        help="rows, comma-separated")
    parser.add_argument("--engines", type=name_list(ENGINES), default=list(ENGINES))
    parser.add_argument("--columns", type=at_least(1), default=64)
    args = parser.parse_args()
    sizes, engines = args.sizes, args.engines
    results: dict = {engine: {} for engine in engines}
    floors, floor_loads = {}, {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("STOKER_BENCH_DIR")) as tmp:
        for rows in sizes:
            raw = Path(tmp) / f"raw-{rows}"
            synthetic(raw, rows, args.columns)
            floors[rows] = floor_rows_per_s(raw, Path(tmp) / "floor", rows)
            floor_loads[rows] = round(os.getloadavg()[0], 2)
            for engine in engines:
                output = Path(tmp) / f"out-{engine}"
                result = run_prepare(engine, raw, output)
                result["over_floor"] = round(result["rows_per_s"] / floors[rows], 3)
                # On a shared machine a figure means little without the load it was taken under.
                result["load_1m"] = round(os.getloadavg()[0], 2)
                results[engine][str(rows)] = result
                subprocess.run(["rm", "-rf", str(output)], check=True)
            subprocess.run(["rm", "-rf", str(raw)], check=True)
    summary: dict = {"benchmark": "prepare_scale", "columns": args.columns, "sizes": sizes,
                     "floor_rows_per_s": {str(k): v for k, v in floors.items()},
                     "floor_load_1m": {str(k): v for k, v in floor_loads.items()}, "engines": results}
    small, large = str(min(sizes)), str(max(sizes))
    if len(sizes) > 1:
        for engine in engines:
            per = results[engine]
            per["peak_growth"] = round(per[large]["peak_mb"] / per[small]["peak_mb"], 3)
            per["throughput_ratio"] = round(per[large]["rows_per_s"] / per[small]["rows_per_s"], 3)
        summary["ratio_sizes"] = [int(small), int(large)]
        summary["peak_growth_ok"] = all(results[e]["peak_growth"] <= 1.5 for e in engines)
        summary["throughput_ok"] = all(results[e]["throughput_ratio"] >= 0.8 for e in engines)
    if "16000000" in results[engines[0]]:
        summary["peak_mb_16m_ok"] = all(results[e]["16000000"]["peak_mb"] <= 4096 for e in engines)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
