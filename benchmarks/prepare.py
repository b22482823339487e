"""Preparation throughput: 1M rows x 64 float columns (clean + standardize + split + write).

Both engines: `local` (in-process) and `ray` (per-file read tasks and per-shard encode/write
tasks on an embedded 2-CPU Ray cluster, started before the clock). Baseline, in the same run:
reading the same raw Parquet files and writing them back out with pyarrow, no cleaning or
transforms (the I/O floor). Prints one JSON line.
Usage: python benchmarks/prepare.py [--rows 1000000] [--columns 64] [--engines local,ray]
"""

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stoker.datasets.config import DataConfig
from stoker.datasets.prepare import prepare


def synthetic(directory: Path, rows: int, columns: int, files: int = 8) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    per_file = rows // files
    for index in range(files):
        data = {f"f{c}": rng.normal(c, 1 + c % 5, per_file).astype(np.float64) for c in range(columns)}
        data["f0"][rng.random(per_file) < 0.001] = np.nan  # a few gaps for the missing-value policy
        data["target"] = rng.integers(0, 10, per_file)
        pq.write_table(pa.table(data), directory / f"raw-{index:03d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--columns", type=int, default=64)
    parser.add_argument("--engines", default="local,ray")
    args = parser.parse_args()
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        synthetic(raw, args.rows, args.columns)

        started = time.perf_counter()
        copy = Path(tmp) / "copy"
        copy.mkdir()
        for path in sorted(raw.iterdir()):
            pq.write_table(pq.read_table(path), copy / path.name)
        baseline_s = time.perf_counter() - started

        results = {}
        for engine in engines:
            if engine == "ray":
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                from stoker.cluster.connect import connect_embedded

                connect_embedded(num_cpus=2)
            started = time.perf_counter()
            manifest = prepare(DataConfig(source=str(raw), label="target", output=str(Path(tmp) / engine),
                                          missing="mean", engine=engine))
            seconds = time.perf_counter() - started
            rows = sum(s["rows"] for s in manifest.splits.values())
            results[engine] = {"s": round(seconds, 2), "rows_per_s": round(rows / seconds),
                               "stages_s": manifest.report["timing"]["stages"], "under_60s": seconds < 60,
                               "splits": {k: v["rows"] for k, v in manifest.splits.items()}}
    first = results[engines[0]]
    print(json.dumps({
        "benchmark": "prepare",
        "rows": rows,
        "columns": args.columns,
        "stoker_s": first["s"],
        "stoker_rows_per_s": first["rows_per_s"],
        "baseline_copy_s": round(baseline_s, 2),
        "ratio_to_copy": round(first["s"] / baseline_s, 2),
        "engines": results,
        "same_splits": len({json.dumps(r["splits"]) for r in results.values()}) == 1,
        "under_60s": all(r["under_60s"] for r in results.values()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()
