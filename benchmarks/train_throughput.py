"""Training throughput: `stoker train` vs a hand-written Ray Train + DeepSpeed script.

Same workload for both (tabular MLP 64->512->512->10, 262,144 training rows, batch 256 per
worker, 2 workers, 1 epoch) at ZeRO 0, 1, 2 and 3, plus plain PyTorch DDP through Ray Train.
Samples/s is measured the same way in both: rows trained / wall time of the epoch's training
loop inside the workers (start-up, validation and checkpointing excluded).
Prints one JSON line: {"zero0": {"stoker_samples_per_s", "raw_samples_per_s", "ratio"}, ...,
"ddp": {"samples_per_s"}}.

Usage: .venv/bin/python benchmarks/train_throughput.py [--rows 262144] [--stages 0,1,2,3]
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

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

FEATURES, CLASSES, BATCH, WORKERS = 64, 10, 256, 2
TRAIN_FRACTION = 0.9


def make_source(path: Path, train_rows: int) -> None:
    total = int(np.ceil(train_rows / TRAIN_FRACTION)) + 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(total, FEATURES)).astype(np.float32)
    y = (x[:, :CLASSES] * rng.normal(size=CLASSES)).argmax(1)
    table = pa.table({**{f"f{i}": x[:, i] for i in range(FEATURES)}, "target": y})
    pq.write_table(table, path)


def stoker_config(source: Path, prepared: Path, storage: Path, stage: int) -> dict:
    return {
        "name": f"bench-zero{stage}", "storage": str(storage),
        "data": {"source": str(source), "label": "target", "output": str(prepared),
                 "split": {"train": TRAIN_FRACTION, "validation": 0.05, "test": 0.05, "stratify": False}},
        "model": {"name": "mlp", "hidden": [512, 512]},
        "train": {"epochs": 1, "batch_size": BATCH, "optimizer": {"name": "adamw", "lr": 0.001},
                  "deepspeed": {"zero_stage": stage}, "max_failures": 0},
        "scaling": {"num_workers": WORKERS},
    }


def raw_deepspeed_loop(config: dict) -> float:
    """What Ray's DeepSpeed example does: initialize, iterate the shard, backward, step."""
    import deepspeed
    import ray.train
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, CLASSES))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config["ds"])
    columns = [f"f{i}" for i in range(FEATURES)]  # stoker's prepare keeps the column names

    def collate(batch):
        x = torch.from_numpy(np.stack([batch[c] for c in columns], axis=1)).float()
        return x, torch.from_numpy(batch["label"])

    loss_fn = nn.CrossEntropyLoss()
    shard = ray.train.get_dataset_shard("train")
    started, rows = time.perf_counter(), 0
    for x, y in shard.iter_torch_batches(batch_size=BATCH, collate_fn=collate):
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()
        rows += len(y)
    elapsed = time.perf_counter() - started
    return rows * ray.train.get_context().get_world_size() / elapsed


def raw_ddp_loop(config: dict) -> float:
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(
        nn.Sequential(nn.Linear(FEATURES, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, CLASSES))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.001)
    columns = [f"f{i}" for i in range(FEATURES)]

    def collate(batch):
        return torch.from_numpy(np.stack([batch[c] for c in columns], axis=1)).float(), torch.from_numpy(batch["label"])

    loss_fn = nn.CrossEntropyLoss()
    started, rows = time.perf_counter(), 0
    for x, y in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=BATCH, collate_fn=collate):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        rows += len(y)
    elapsed = time.perf_counter() - started
    return rows * ray.train.get_context().get_world_size() / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=262_144)
    parser.add_argument("--stages", default="0,1,2,3")
    args = parser.parse_args()
    stages = [int(s) for s in args.stages.split(",")]

    from stoker.cluster.connect import connect_embedded
    from stoker.config import parse_config
    from stoker.datasets.prepare import prepare
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.resources import plan_resources
    from stoker.trainer.run import train

    work = Path(tempfile.mkdtemp(prefix="stoker-bench-"))
    source = work / "source.parquet"
    make_source(source, args.rows)
    prepared, storage = work / "prepared", work / "runs"
    prepare(parse_config(stoker_config(source, prepared, storage, 0), "bench").data)
    resources = connect_embedded()
    out: dict = {"rows": None, "batch_per_worker": BATCH, "workers": WORKERS}
    for stage in stages:
        run = parse_config(stoker_config(source, prepared, storage, stage), "bench")
        plan = plan_resources(run.scaling, resources)
        # Hand-written run first, then stoker, so neither always gets the warmer machine.
        ds = deepspeed_config(run.train, WORKERS, 1)
        raw = _raw_samples(raw_deepspeed_loop, prepared, storage, f"raw-zero{stage}", {"ds": ds}, plan.cpus_per_worker)
        result = train(run)
        record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        ours = record["samples_per_s"]
        out["rows"] = json.loads((result.run_dir / "dataset.json").read_text())["rows"]["train"]
        out[f"zero{stage}"] = {"stoker_samples_per_s": round(ours, 1), "raw_samples_per_s": round(raw, 1),
                               "ratio": round(ours / raw, 3)}
        print(f"zero{stage}: {out[f'zero{stage}']}", file=sys.stderr, flush=True)
    plan = plan_resources(parse_config(stoker_config(source, prepared, storage, 0), "bench").scaling, resources)
    out["ddp"] = {"samples_per_s": round(_raw_samples(raw_ddp_loop, prepared, storage, "raw-ddp", {}, plan.cpus_per_worker), 1)}
    print(json.dumps(out))


def _raw_samples(loop, prepared, storage, name, config, cpus) -> float:
    """Samples/s of a hand-written loop (rank 0's return value: rows x world size / time)."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config=config,
        datasets={"train": ray.data.read_parquet(str(prepared / "train"), num_cpus=1)},
        scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    return float(trainer.fit().return_value)


if __name__ == "__main__":
    main()
