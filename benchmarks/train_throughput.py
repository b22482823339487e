"""Training throughput: `stoker train` vs a hand-written Ray Train + DeepSpeed script, and
both against the limit: the same training with no Ray at all, data already in memory.

Same workload for every side (tabular MLP 64->512->512->10, AdamW, 262,144 training rows,
batch 256 per worker, 2 workers, 1 epoch, as many torch threads per worker as stoker's workers
get CPUs) at ZeRO 0, 1, 2 and 3. Sides:
- stoker: `stoker.trainer.run.train`;
- raw: a hand-written Ray Train + DeepSpeed script (Ray's DeepSpeed example), plus plain
  PyTorch DDP through Ray Train (`ddp`);
- limit: 2 processes (torch.multiprocessing, gloo over tcp://127.0.0.1), each with its half of
  the training rows as in-memory tensors, sliced into batches: plain DDP (`ddp_limit`, the
  limit of ZeRO 0) and a plain DeepSpeed engine per stage (that stage's own limit).
Samples/s is measured the same way in all: rows trained / wall time of the epoch's training
loop inside the workers (start-up, validation and checkpointing excluded).

Prints one JSON line; per stage `zero<N>`: stoker_samples_per_s, raw_samples_per_s, `ratio`
(stoker / raw), limit_samples_per_s and limit_rows (rows the plain DeepSpeed loop trained),
`over_limit` (stoker / that limit), at ZeRO 0 `over_ddp_limit` (stoker / plain DDP), and
`breakdown`: seconds of stoker's epoch (rank 0) waiting for batches, in forward+backward, in
the optimizer step and in the rest (the record's time_*_s, stoker.trainer.timing), with
`limit_breakdown` the same for the limit loop, and `load_at_stoker` (the 1-minute load average
when stoker's side started; `load_at_limit` for the limits). Plus `ddp` (through Ray Train) and
`ddp_limit`.
A key needing a side that did not run is left out.

Usage: .venv/bin/python benchmarks/train_throughput.py [--rows 262144] [--stages 0,1,2,3]
       [--sides stoker,raw,limit]
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed builds its shared-memory comm extension with the `ninja` first on PATH, and a system
# ninja cannot read the venv ninja's build log: the limit's processes (which inherit this PATH)
# rebuilt it, stoker's workers (venv first, stoker.cluster.connect) rebuilt it again, and one of
# those 80-160 s builds on 2 CPUs once landed in stoker's timed epoch (0.34x the DDP limit).
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flags import OneLineParser, at_least, int_list, name_list  # noqa: E402

FEATURES, CLASSES, BATCH, WORKERS = 64, 10, 256, 2
TRAIN_FRACTION = 0.9
STAGES, SIDES = (0, 1, 2, 3), ("stoker", "raw", "limit")
# Fewer rows leave the 5% validation and test splits too small to split across the workers.
MIN_ROWS = 1024
PHASES = ("wait", "compute", "step", "other")


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


def mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(FEATURES, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, CLASSES))


def limit_worker(rank: int, configs: list[dict | None], train_dir: str, threads: int, port: int, result: str) -> None:
    """One of the limit's 2 processes: for each of `configs` in turn, plain DDP (None) or a
    plain DeepSpeed engine, over this rank's contiguous half of the training rows as tensors,
    no Ray and no collation. One pair of processes for every side: each process pays its
    imports (torch, DeepSpeed) once."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    # DeepSpeed's own init reads these; the process group itself is the one created here.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORKERS), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(WORKERS))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS)
    table = pq.read_table(train_dir, columns=[*(f"f{i}" for i in range(FEATURES)), "label"])
    per = table.num_rows // WORKERS  # as Ray's equal split: every rank the same number of rows
    part = table.slice(rank * per, per)
    x = torch.from_numpy(np.stack([part[f"f{i}"].to_numpy() for i in range(FEATURES)], axis=1)).float()
    y = torch.from_numpy(part["label"].to_numpy()).long()
    results = [limit_pass(ds, x, y, per) for ds in configs]
    if rank == 0:
        Path(result).write_text(json.dumps(results))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()


def limit_pass(ds: dict | None, x, y, per: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.manual_seed(0)
    model = mlp()
    if ds is None:
        model = nn.parallel.DistributedDataParallel(model)
        # stoker's AdamW as it reaches DeepSpeed (stoker.trainer.deepspeed_config).
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.001, weight_decay=0.0, fused=True)
        forward, backward = model, lambda loss: loss.backward()

        def step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        forward, backward, step = engine, engine.backward, engine.step
    loss_fn = nn.CrossEntropyLoss()
    dist.barrier()
    compute_s = step_s = 0.0
    started = time.perf_counter()
    for i in range(0, per, BATCH):
        began = time.perf_counter()
        backward(loss_fn(forward(x[i:i + BATCH]), y[i:i + BATCH]))
        computed = time.perf_counter()
        step()
        stepped = time.perf_counter()
        compute_s, step_s = compute_s + computed - began, step_s + stepped - computed
    seconds = time.perf_counter() - started
    return {"samples_per_s": round(per * WORKERS / seconds, 1), "rows": per * WORKERS, "epoch_s": round(seconds, 4),
            "breakdown": {k: round(v, 4) for k, v in {
                "wait_s": 0.0, "compute_s": compute_s, "step_s": step_s,
                "other_s": max(seconds - compute_s - step_s, 0.0)}.items()}}


def limit_sides(configs: list[dict | None], train_dir: Path, threads: int, work: Path) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = work / f"limit-{port}.json"
    try:
        mp.spawn(limit_worker, args=(configs, str(train_dir), threads, port, str(result)), nprocs=WORKERS, join=True)
    except mp.ProcessExitedException as exc:
        # A worker that dies in teardown (seen once: gloo's "terminate called without an
        # active exception" after 5 passes) has already measured; one that died before rank 0
        # wrote every pass's figures has not, and that fails the benchmark.
        if not result.exists():
            raise
        print(f"train_throughput: a limit worker failed after its passes were measured ({exc})", file=sys.stderr)
    return json.loads(result.read_text())


def main() -> None:
    parser = OneLineParser(prog="benchmarks/train_throughput.py", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=at_least(MIN_ROWS), default=262_144, help="training rows")
    parser.add_argument("--stages", type=int_list(allowed=STAGES), default=list(STAGES),
                        help="ZeRO stages, comma-separated (default 0,1,2,3)")
    parser.add_argument("--sides", type=name_list(SIDES), default=list(SIDES),
                        help="which sides run, comma-separated (default stoker,raw,limit)")
    args = parser.parse_args()
    stages, sides = args.stages, args.sides

    from stoker.cluster.connect import connect_embedded
    from stoker.config import parse_config
    from stoker.datasets.manifest import Manifest
    from stoker.datasets.prepare import prepare
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.resources import plan_resources
    from stoker.trainer.run import train
    from stoker.trainer.run_dir import METRICS

    work = Path(tempfile.mkdtemp(prefix="stoker-bench-"))
    source = work / "source.parquet"
    make_source(source, args.rows)
    prepared, storage = work / "prepared", work / "runs"
    prepare(parse_config(stoker_config(source, prepared, storage, 0), "bench").data)
    rows = Manifest.read(prepared).splits["train"]["rows"]
    if {"stoker", "raw"} & set(sides):
        resources = connect_embedded()
        cpus = plan_resources(parse_config(stoker_config(source, prepared, storage, 0), "bench").scaling,
                              resources).cpus_per_worker
    else:  # what plan_resources gives on this machine, without starting Ray for it
        cpus = max(1, (os.cpu_count() or 2) // WORKERS)
    threads = max(1, int(cpus))  # Ray sets OMP_NUM_THREADS to a worker's whole CPUs, at least 1
    out: dict = {"rows": rows, "batch_per_worker": BATCH, "workers": WORKERS, "threads_per_worker": threads,
                 "sides": sides}
    runs = {stage: parse_config(stoker_config(source, prepared, storage, stage), "bench") for stage in stages}
    ds_configs = {stage: deepspeed_config(run.train, WORKERS, 1) for stage, run in runs.items()}
    # The limits first, all in one pair of processes (plain DDP, then each stage's DeepSpeed).
    # The 1-minute load at each side's start: on a shared 2-CPU machine the sides' ratios move
    # with what else runs (0.50 to 0.88 over_ddp_limit for the same code within an hour).
    out["load_at_limit"] = round(os.getloadavg()[0], 2)
    ddp_limit, *stage_limits = (limit_sides([None, *ds_configs.values()], prepared / "train", threads, work)
                                if "limit" in sides else [None])
    if ddp_limit:
        out["ddp_limit"] = ddp_limit
    for stage, run in runs.items():
        ds = ds_configs[stage]
        side: dict = {}
        # Hand-written run first, then stoker, so neither always gets the warmer machine.
        if "raw" in sides:
            side["raw_samples_per_s"] = round(
                _raw_samples(raw_deepspeed_loop, prepared, storage, f"raw-zero{stage}", {"ds": ds}, cpus), 1)
        if "stoker" in sides:
            side["load_at_stoker"] = round(os.getloadavg()[0], 2)
            result = train(run)
            record = json.loads((result.run_dir / METRICS).read_text().splitlines()[-1])
            side["stoker_samples_per_s"] = round(record["samples_per_s"], 1)
            side["breakdown"] = {f"{p}_s": round(record[f"time_{p}_s"], 4) for p in PHASES}
            side["epoch_s"] = round(record["epoch_time_s"], 4)
        if "limit" in sides:
            limit = stage_limits[stages.index(stage)]
            side.update(limit_samples_per_s=limit["samples_per_s"], limit_rows=limit["rows"],
                        limit_epoch_s=limit["epoch_s"], limit_breakdown=limit["breakdown"])
        ours = side.get("stoker_samples_per_s")
        if ours and "raw_samples_per_s" in side:
            side["ratio"] = round(ours / side["raw_samples_per_s"], 3)
        if ours and "limit_samples_per_s" in side:
            side["over_limit"] = round(ours / side["limit_samples_per_s"], 3)
        if ours and stage == 0 and ddp_limit:
            side["over_ddp_limit"] = round(ours / ddp_limit["samples_per_s"], 3)
        out[f"zero{stage}"] = side
        print(f"zero{stage}: {side}", file=sys.stderr, flush=True)
    if "raw" in sides:
        out["ddp"] = {"samples_per_s": round(_raw_samples(raw_ddp_loop, prepared, storage, "raw-ddp", {}, cpus), 1)}
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
