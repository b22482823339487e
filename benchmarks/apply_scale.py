"""`stoker data apply` at scale: does its memory stay bounded as the new data grows?

A dataset is prepared once (local engine) from synthetic data as `prepare.py`'s (float64
columns, Parquet files) at the smallest size; `apply` then encodes new data of each size with
its transform, each run in a fresh subprocess that reports its own peak RSS (VmHWM) and
rows/s. Baselines in the same run: the RSS of a process that only imports `apply` (the floor
every run pays), and the peak of reading each size whole into pandas (what an implementation
that holds the source at once needs, before it encodes anything). Prints one JSON line.

Memory is bounded by a batch (`file_passes.BATCH_ROWS` rows), so the sizes compared should each fill
batches: with the default 2 files, 200k rows are 100k-row files. With 8 files they would be 25k
rows, less than one 65,536-row batch, and the ratio would measure how full the small size's
batches are, not growth with the rows.

Usage: python benchmarks/apply_scale.py [--sizes 200000,800000] [--columns 32] [--files 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import synthetic  # noqa: E402

PEAK_GROWTH_MAX = 1.3

# Peak RSS from VmHWM, the high-water mark of this process's own memory: ru_maxrss would carry
# over the parent's (it survives fork and exec), which holds the prepared data's imports.
_PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"

_APPLY = """
import json, sys, time
from stoker.datasets.apply import apply
prepared, source, output = sys.argv[1:4]
started = time.perf_counter()
summary = apply(prepared, source, output)
print(json.dumps({"s": time.perf_counter() - started, "rows": summary["rows"],
                  "peak_mb": PEAK}))
""".replace("PEAK", _PEAK)

_IMPORT_ONLY = """
import json
from stoker.datasets.apply import apply  # noqa: F401
print(json.dumps({"peak_mb": PEAK}))
""".replace("PEAK", _PEAK)

_WHOLE_READ = """
import json, sys
import pyarrow.parquet as pq
frame = pq.read_table(sys.argv[1]).to_pandas()
print(json.dumps({"peak_mb": PEAK}))
""".replace("PEAK", _PEAK)


def child(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise SystemExit(f"subprocess failed: {lines[-1] if lines else result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="200000,800000")
    parser.add_argument("--columns", type=int, default=32)
    parser.add_argument("--files", type=int, default=2)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    from stoker.datasets import file_passes
    from stoker.datasets.config import DataConfig
    from stoker.datasets.prepare import prepare

    results: dict = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("STOKER_BENCH_DIR")) as tmp:
        prepared = Path(tmp) / "prepared"
        for rows in sizes:
            raw = Path(tmp) / f"raw-{rows}"
            synthetic(raw, rows, args.columns, files=args.files)
            if not prepared.exists():
                prepare(DataConfig(source=str(raw), label="target", output=str(prepared), missing="mean"))
            output = Path(tmp) / f"enc-{rows}.parquet"
            run = child(_APPLY, str(prepared), str(raw), str(output))
            assert run["rows"] == rows, run
            results[str(rows)] = {
                "peak_mb": round(run["peak_mb"]), "rows_per_s": round(rows / run["s"]), "s": round(run["s"], 2),
                "whole_read_peak_mb": round(child(_WHOLE_READ, str(raw))["peak_mb"]),
            }
            subprocess.run(["rm", "-rf", str(raw), str(output)], check=True)
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    growth = round(large["peak_mb"] / small["peak_mb"], 3)
    print(json.dumps({
        "benchmark": "apply_scale", "columns": args.columns, "files": args.files, "batch_rows": file_passes.BATCH_ROWS,
        "sizes": sizes, "apply": results,
        "import_floor_mb": round(child(_IMPORT_ONLY)["peak_mb"]),
        "peak_growth": growth, "peak_growth_ok": growth <= PEAK_GROWTH_MAX,
        "whole_read_growth": round(large["whole_read_peak_mb"] / small["whole_read_peak_mb"], 3),
        "throughput_ratio": round(large["rows_per_s"] / small["rows_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
