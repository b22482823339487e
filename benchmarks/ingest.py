"""Ingest throughput: prepared Parquet shards (1M rows x 64 float features) into 2 Ray Train
workers through stoker's ingest path (`read_split` + `streaming_split` + `iter_split`), against a
raw single-process `pyarrow.parquet.ParquetFile.iter_batches` loop over the same files, in the
same run; then a 2-worker DeepSpeed training on the same data, whose per-epoch
`data_wait_fraction` is the share of an epoch's pass (first `next()` to the last) that rank 0
spent blocked waiting for its next batch. `stoker_wait_fraction` is the whole training's: all
waiting over all passes, the first epoch's start-up (split coordinator actor, executor, first
block) included; the first epoch and the later ones are also reported apart. Prints one JSON line.
Usage: python benchmarks/ingest.py [--rows 1000000] [--epochs 3] [--object-store-mb MB]

`--object-store-mb` starts the cluster with an object store of that size: with a training split
larger than it (`split_mb` > `object_store_mb`, e.g. `--rows 2000000 --object-store-mb 512`),
the run must stream the split every epoch instead of caching it (`materialized` false), and
`stoker_wait_fraction` says whether the workers still get their batches in time.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import synthetic  # noqa: E402

BATCH = 1024


def raw_loop(files: list[Path], features: list[str]) -> tuple[float, int]:
    started, rows = time.perf_counter(), 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH):
            x = torch.from_numpy(np.stack([batch.column(f).to_numpy() for f in features], axis=1))
            rows += len(x)
    return time.perf_counter() - started, rows


def read_only_loop(config: dict) -> dict:
    import ray.train

    from stoker.datasets.ingest import WaitClock, iter_split

    clock, rows = WaitClock(), 0
    for x, _ in clock.iterate(iter_split(ray.train.get_dataset_shard("train"), config["features"], BATCH,
                                         torch.device("cpu"), torch.float32, shuffle_seed=0)):
        rows += len(x)
    # Train V2: rank 0's return value comes back as Result.return_value.
    return {"rows": rows, "first_batch_s": clock.first_batch_s,
            "seconds": time.perf_counter() - clock._started, "wait_fraction": clock.fraction()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--object-store-mb", type=int, default=None)
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stoker.cluster.connect import connect_embedded
    from stoker.config import parse_config
    from stoker.datasets.config import DataConfig
    from stoker.datasets.ingest import _should_materialize, read_split
    from stoker.datasets.manifest import Manifest
    from stoker.datasets.prepare import prepare
    from stoker.trainer.run import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic(tmp / "raw", args.rows, 64)
        prepared = tmp / "prepared"
        # All rows in the training split: the benchmark reads 1M rows, not 70% of them.
        manifest = prepare(DataConfig(source=str(tmp / "raw"), label="target", output=str(prepared),
                                      missing="mean", split={"train": 0.98, "validation": 0.01, "test": 0.01}))
        files = [prepared / f for f in manifest.splits["train"]["files"]]
        rows = manifest.splits["train"]["rows"]

        raw_s, raw_rows = raw_loop(files, manifest.features)

        if args.object_store_mb:
            # Started here with the small store; connect_embedded (and `train`) then reuse it.
            ray.init(num_cpus=2, object_store_memory=args.object_store_mb * 2**20, include_dashboard=False)
        connect_embedded(num_cpus=2)
        split_info = Manifest.read(prepared).splits["train"]
        # What `auto` decides for this run's training split (can_stream: 2 workers leave a CPU).
        materialized = _should_materialize(DataConfig(source=".", label="y", output=".").ingest, split_info, "train",
                                           args.epochs, can_stream=True)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        started = time.perf_counter()
        trainer = TorchTrainer(
            read_only_loop,
            train_loop_config={"features": manifest.features},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="ingest-bench", storage_path=str(tmp / "ray")),
            datasets={"train": read_split(prepared, "train", 0.5)},
        )
        result = trainer.fit()
        wall_s = time.perf_counter() - started
        reported = result.return_value
        # Both ranks read an equal half (streaming_split(equal=True)); rank 0's time is the run's.
        stoker_s = reported["seconds"]

        config = {
            "name": "ingest-bench-train", "storage": str(tmp / "runs"),
            "data": {"source": str(tmp / "raw"), "label": "target", "output": str(prepared), "missing": "mean"},
            "model": {"name": "mlp", "hidden": [64]},
            "train": {"epochs": args.epochs, "batch_size": BATCH, "optimizer": {"name": "adamw", "lr": 0.001},
                      "deepspeed": {"zero_stage": 2}},
            "scaling": {"num_workers": 2},
        }
        trained = train(parse_config(config, "benchmark"))
        history = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
        waited = [r["data_wait_fraction"] * r["epoch_time_s"] for r in history]
        passes = [r["epoch_time_s"] for r in history]
        wait = sum(waited) / sum(passes)
        later = sum(waited[1:]) / sum(passes[1:]) if len(passes) > 1 else None

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "benchmark": "ingest",
        "rows": rows,
        "stoker_rows_per_s": round(rows / stoker_s),
        "stoker_wall_s_including_startup": round(wall_s, 2),
        "stoker_worker_read_s": round(stoker_s, 2),
        "raw_rows_per_s": round(raw_rows / raw_s),
        "ratio": round((rows / stoker_s) / (raw_rows / raw_s), 3),
        "time_to_first_batch_s": round(reported["first_batch_s"], 3),
        "peak_rss_mb": round(peak),
        "split_mb": round(split_info["bytes"] / 2**20),
        "object_store_mb": round(ray.cluster_resources().get("object_store_memory", 0) / 2**20)
        if ray.is_initialized() else None,
        "materialized": materialized,
        "stoker_wait_fraction": round(wait, 4),
        "wait_fraction_first_epoch": round(history[0]["data_wait_fraction"], 4),
        "wait_fraction_later_epochs": None if later is None else round(later, 4),
        "first_batch_s_per_epoch": [round(r["first_batch_s"], 3) for r in history],
        "wait_fraction_per_epoch": [round(r["data_wait_fraction"], 4) for r in history],
        "train_epoch_s": [round(r["epoch_time_s"], 2) for r in history],
    }))


if __name__ == "__main__":
    main()
