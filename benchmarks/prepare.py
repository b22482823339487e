"""Preparation throughput: 1M rows x 64 float columns (clean + standardize + split + write).

Baseline, in the same run: reading the same raw Parquet files and writing them back out with
pyarrow, no cleaning or transforms (the I/O floor). Prints one JSON line.
Usage: python benchmarks/prepare.py [--rows 1000000] [--columns 64]
"""

import argparse
import json
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        synthetic(raw, args.rows, args.columns)

        started = time.perf_counter()
        copy = Path(tmp) / "copy"
        copy.mkdir()
        for path in sorted(raw.iterdir()):
            pq.write_table(pq.read_table(path), copy / path.name)
        baseline_s = time.perf_counter() - started

        started = time.perf_counter()
        manifest = prepare(DataConfig(source=str(raw), label="target", output=str(Path(tmp) / "prepared"),
                                      missing="mean"))
        stoker_s = time.perf_counter() - started
    rows = sum(s["rows"] for s in manifest.splits.values())
    print(json.dumps({
        "benchmark": "prepare",
        "rows": rows,
        "columns": args.columns,
        "stoker_s": round(stoker_s, 2),
        "stoker_rows_per_s": round(rows / stoker_s),
        "baseline_copy_s": round(baseline_s, 2),
        "ratio_to_copy": round(stoker_s / baseline_s, 2),
        "stages_s": manifest.report["timing"]["stages"],
        "under_60s": stoker_s < 60,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()
