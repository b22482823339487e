"""Resuming at another world size and ZeRO stage: `resize_exact`.

Every case of tests/trainer/resize_cases.py's full matrix: a checkpoint saved by N ranks at
ZeRO stage s (stoker's MLP on the digits' shape, two AdamW steps with different batches per
rank) is resumed by M ranks at stage t the way a run resumes (the driver's
`checkpoint_resize.prepare`, then the workers' `loop._resume`), for N -> M in {1,2,3} x {1,2,3}
at ZeRO 0-3, plus ZeRO 1 -> 3 (2 -> 2 ranks), 3 -> 2 (3 -> 2), 0 -> 2 (2 -> 1) and 2 -> 0
(2 -> 3). A case is exact when every parameter's fp32 weights and Adam state (`exp_avg`,
`exp_avg_sq`), the optimizer's step and DeepSpeed's step counter, read back through
DeepSpeed's own accessors after the resume, are `torch.equal` to those read before the save.
CPU, gloo, one process per rank, no Ray.

Prints one JSON line: resize_exact (fraction of exact cases; must be 1.0), cases, failed
(the cases that were not, as [N, s, M, t]), seconds.

`--drain`: a node of a real two-node cluster drained mid-epoch with a 30 s deadline and lost
(tests/cluster/drain_scenario.py, an elastic digits run): `drain_lost_steps` (the drained
epoch's optimizer steps against the steps before its checkpoint plus the rest at the new
size: steps lost, or negative for steps trained twice; must be at most 1 either way) and
`recovery_over_startup` (from the node's loss to the first epoch on the node left, over the
run's own launch to first epoch; the issue asks for at most 1.2), with both times.

`--metric-gap`: examples/digits.yaml (its model, data and seed; the data from `stoker data
sample digits`, prepared with `stoker data prepare`, as the README does) trained for 20 epochs
with `stoker train` twice: uninterrupted at 2 workers, and resized, stopped with SIGTERM (exit
130, as a scheduler stops it) once epoch 6's record is logged and rerun at 1 worker, stopped
again once epoch 13's is and rerun at 2 (the same config, name and storage each time: the run
resumes from its last checkpoint, converted for the new world size; `train.epochs` stays 20,
so the schedule is the run's). `resized_metric_gap`: the absolute difference of the two runs'
final (epoch 19) validation accuracy (must be at most 0.01), with both accuracies, the epochs
whose epoch record first shows the new world size (`resized_at`), the world size each epoch
ended at, and `stops`: where each SIGTERM checkpointed ([epoch, micro-step, steps in that
epoch]). `stoker train` checkpoints where the workers are when it is stopped, at rank 0's next
poll (about one a second), so a resize lands some steps into epoch 7 (or 14), whose remaining
steps run at the new size, or later when epochs are shorter than the poll interval
(`as_planned` false: 1-worker digits epochs take 0.2 s).

`--convert`: `convert_over_save` (must be at most 1.0): the time of the driver's conversion of
a checkpoint for another world size (`checkpoint_resize.prepare` for 1 rank at ZeRO 2, this
process) over the time of its save (2 ranks, gloo, each `checkpoint_guard.stamp`,
`save_checkpoint`, `checkpoints.finish` as the workers do, until the slower rank is done), for
benchmarks/zero_memory.py's model (~38M parameters, a 577 MB checkpoint) after one AdamW step;
medians of 5 saves each converted, each timing started with the page cache's dirty pages
written out (`os.sync`), so neither pays for the other's writes. `resume_s` is the workers'
part that follows (`checkpoint_resize.resume_state` for the one new rank: every parameter and
optimizer state joined from the shards), so that a driver's saving cannot hide as a worker's
cost.

Usage: .venv/bin/python benchmarks/elastic.py [--drain | --metric-gap | --convert]
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.trainer.resize_cases
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parent.parent


def _stoker(*args: str, cwd: Path, log: Path, stop_after: tuple[Path, int] | None = None) -> int:
    """`stoker ARGS` as a user runs it; with `stop_after` (run directory, epoch), SIGTERM once
    that epoch's record is logged (its checkpoint is in: the driver logs an epoch on Ray's report)."""
    from stoker.trainer.run_dir import Records

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("STOKER_REGISTRY_URL", None)  # the registry beside the run's storage
    with open(log, "a") as sink:  # a file, not a pipe: Ray's lines must never block the child
        process = subprocess.Popen([sys.executable, "-m", "stoker", *args], cwd=cwd, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
        try:
            if stop_after is not None:
                records, epoch = Records(stop_after[0]), stop_after[1]
                while process.poll() is None and not any(r["epoch"] == epoch for r in _epochs(records)):
                    time.sleep(0.02)
                process.send_signal(signal.SIGTERM)
            return process.wait(timeout=1800)
        finally:
            if process.poll() is None:
                process.kill()


def _epochs(records) -> list[dict]:
    try:
        return records.metrics()
    except (OSError, ValueError):
        return []  # a line being written


def metric_gap(epochs: int = 20, resizes: tuple[tuple[int, int], ...] = ((7, 1), (14, 2))) -> dict:
    """examples/digits.yaml trained uninterrupted at 2 workers, and the same run stopped after
    `epoch` epochs and resumed at `workers` for each of `resizes`; the final validation accuracy
    of each."""
    import yaml

    from stoker.trainer.run_dir import Records

    example = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="stoker-elastic-") as tmp:
        out, log = Path(tmp), Path(tmp) / "stoker.log"
        # The README's steps, with absolute paths so the configs can live anywhere.
        example["data"].update(source=str(out / "digits.csv"), output=str(out / "prepared"))
        example.update(storage=str(out / "runs"))
        example["train"]["epochs"] = epochs

        def config(name: str, workers: int) -> str:
            path = out / f"{name}-{workers}.yaml"
            path.write_text(yaml.safe_dump({**example, "name": name, "scaling": {**example["scaling"],
                                                                                "num_workers": workers}}))
            return str(path)

        started = time.perf_counter()
        for args in (("data", "sample", "digits", str(out / "digits.csv")), ("data", "prepare", config("whole", 2))):
            if _stoker(*args, cwd=out, log=log) != 0:
                raise SystemExit(f"stoker {' '.join(args)} failed: {log.read_text()[-2000:]}")
        codes = [_stoker("train", config("whole", 2), cwd=out, log=log)]
        workers = example["scaling"]["num_workers"]
        for epoch, then in resizes:  # stopped once epoch `epoch - 1` is in, the epochs from `epoch` on at `then`
            codes.append(_stoker("train", config("resized", workers), cwd=out, log=log,
                                 stop_after=(out / "runs" / "resized", epoch - 1)))
            workers = then
        codes.append(_stoker("train", config("resized", workers), cwd=out, log=log))
        if codes != [0] + [130] * len(resizes) + [0]:
            raise SystemExit(f"stoker train exited {codes}: {log.read_text()[-3000:]}")
        whole, resized = (_epochs(Records(out / "runs" / name)) for name in ("whole", "resized"))
        # SIGTERM checkpoints where the workers are (stoker.trainer.stop_flag): each stop's
        # epoch, micro-step and steps in that epoch at the old size.
        stops = [[e["epoch"], e["micro_step"], e["steps_in_epoch"]] for e in Records(out / "runs" / "resized").events()
                 if e.get("event") == "stopped"]
    # Where the world size changed, as the resized run's epoch records say (an epoch finished
    # before a stop landed would show here).
    changed = [r["epoch"] for before, r in zip(resized, resized[1:], strict=False)
               if r.get("world_size") != before.get("world_size")]
    accuracy = {"uninterrupted": round(whole[-1]["val_accuracy"], 4), "resized": round(resized[-1]["val_accuracy"], 4)}
    return {"resized_metric_gap": round(abs(accuracy["resized"] - accuracy["uninterrupted"]), 4),
            "val_accuracy": accuracy, "epochs": [whole[-1]["epoch"] + 1, resized[-1]["epoch"] + 1],
            "resized_at": changed, "stops": stops,
            "as_planned": [stop[0] for stop in stops] == [epoch for epoch, _ in resizes],
            "world_sizes": [r.get("world_size") for r in resized],
            "seconds": round(time.perf_counter() - started, 1)}


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.02)  # a file, not a collective: a waiting rank must not spin on a CPU


def _save(rank: int, world: int, port: int, out: Path, stage: int, repeat: int) -> None:
    """One rank of the saving job: train a step, then `repeat` times save a checkpoint as the
    workers do, each time waiting (idle) while the driver converts it."""
    import torch
    import torch.distributed as dist

    from benchmarks.zero_memory import BATCH, IN, OUT, model_and_spec
    from stoker.trainer import checkpoint_guard as guard
    from stoker.trainer import checkpoints as ckpt
    from stoker.trainer.config import TrainConfig
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.deepspeed_engine import build_engine
    from stoker.trainer.models import build_model, parameter_count
    from tests.trainer.resize_cases import _init

    _init(rank, world, port)
    model, spec = model_and_spec()
    with torch.device("meta"):
        params = parameter_count(build_model(model, spec))
    torch.manual_seed(0)
    engine, _, _ = build_engine(model, spec, deepspeed_config(TrainConfig(batch_size=BATCH, deepspeed={
        "zero_stage": stage}), world, 10, params))
    generator = torch.Generator().manual_seed(rank)  # the ranks' gradients differ
    x, y = torch.randn(BATCH, IN, generator=generator), torch.randint(0, OUT, (BATCH,), generator=generator)
    engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
    engine.step()  # the optimizer state exists
    for attempt in range(repeat):
        if rank == 0:
            os.sync()  # each timing starts with no dirty pages: neither pays for the other's writeback
        dist.barrier()
        started = time.perf_counter()
        guard.stamp(engine, "bench", attempt)
        mine = out / f"rank{rank}-{attempt}"  # each rank its own directory, merged as Ray Train does
        engine.save_checkpoint(str(mine), tag=ckpt.CHECKPOINT_TAG)  # every rank writes its shard
        state = ckpt.stoker_state({"run": "bench", "epoch": attempt, "best": None, "history": []}, engine)
        ckpt.finish(mine, rank, state if rank == 0 else None)
        dist.barrier()  # the save ends when the slowest rank's files are written
        if rank == 0:
            (out / f"saved-{attempt}.json").write_text(json.dumps({"save_s": time.perf_counter() - started,
                                                                   "params": params}))
        _wait_for(out / f"converted-{attempt}")


def convert(stage: int = 2, world: int = 2, target: int = 1, repeat: int = 5) -> dict:
    """`convert_over_save`: the median time of the driver's `checkpoint_resize.prepare` (this
    process) over the median time of the workers' save (`world` processes, gloo)."""
    import torch.multiprocessing as mp

    from stoker.trainer import checkpoint_guard as guard
    from stoker.trainer import checkpoint_resize as resize
    from stoker.trainer import checkpoints as ckpt
    from tests.ports import free_port

    guard.allowed_objects()  # imports DeepSpeed's pickled types: once per driver, not per conversion
    saves, converts, resumes = [], [], []
    with tempfile.TemporaryDirectory(prefix="stoker-convert-") as tmp:
        out = Path(tmp)
        group = mp.spawn(_save, args=(world, free_port(), out, stage, repeat), nprocs=world, join=False)
        for attempt in range(repeat):
            deadline = time.monotonic() + 600
            while not (out / f"saved-{attempt}.json").exists():
                if group.join(timeout=0.02) or time.monotonic() > deadline:
                    raise SystemExit(f"save {attempt} never came: a saving rank ended or hangs")
            saved = json.loads((out / f"saved-{attempt}.json").read_text())
            saves.append(saved["save_s"])
            checkpoint = out / f"checkpoint_{attempt}"
            for rank in range(world):
                for path in sorted((out / f"rank{rank}-{attempt}").rglob("*")):
                    if path.is_file():
                        moved = checkpoint / path.relative_to(out / f"rank{rank}-{attempt}")
                        moved.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(path, moved)
            os.sync()
            started = time.perf_counter()
            if not resize.prepare(checkpoint, target, stage):
                raise SystemExit(f"{world} -> {target} ranks at ZeRO {stage} needed no conversion")
            converts.append(time.perf_counter() - started)
            started = time.perf_counter()
            resize.resume_state(checkpoint, target, stage)
            resumes.append(time.perf_counter() - started)
            sizes = [round(sum(p.stat().st_size for p in (checkpoint / d).iterdir()) / scale)
                     for d, scale in ((ckpt.CHECKPOINT_TAG, 2**20), (resize.CONVERTED, 1))]
            shutil.rmtree(checkpoint)
            (out / f"converted-{attempt}").touch()
        group.join()
    save_s, convert_s = statistics.median(saves), statistics.median(converts)
    return {"convert_over_save": round(convert_s / save_s, 3), "convert_s": round(convert_s, 2),
            "save_s": round(save_s, 2), "resume_s": round(statistics.median(resumes), 2),
            "runs": {"save_s": [round(v, 2) for v in saves], "convert_s": [round(v, 2) for v in converts],
                     "resume_s": [round(v, 2) for v in resumes]},
            "params": saved["params"], "checkpoint_mb": sizes[0], "converted_bytes": sizes[1], "zero_stage": stage,
            "ranks": [world, target], "load_avg_1m": round(os.getloadavg()[0], 1)}

def drain() -> dict:
    from sklearn.datasets import load_digits

    from tests.cluster.drain_scenario import drained_run, steps_of_drained_epoch

    with tempfile.TemporaryDirectory() as out:
        source = Path(out) / "digits.csv"
        load_digits(as_frame=True).frame.to_csv(source, index=False)
        drained = drained_run(source, Path(out), epochs=30, deadline_s=30)
        if drained.code != 0:
            raise SystemExit(f"the drained run exited {drained.code}: {drained.stderr[-2000:]}")
        taken, expected = steps_of_drained_epoch(drained)
    return {"drain_lost_steps": expected - taken, "recovery_s": round(drained.recovery_s, 1),
            "startup_s": round(drained.startup_s, 1),
            "recovery_over_startup": round(drained.recovery_s / drained.startup_s, 3)}


def main() -> None:
    if "--convert" in sys.argv[1:]:
        print(json.dumps(convert()), file=sys.__stdout__)
        return
    if "--metric-gap" in sys.argv[1:]:
        print(json.dumps(metric_gap()))
        return
    if "--drain" in sys.argv[1:]:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        print(json.dumps(drain()))
        return
    from tests.trainer.resize_cases import full_matrix, run_matrix

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = run_matrix(Path(out), full_matrix())
    failed = [r["case"] for r in results if not r["exact"]]
    print(json.dumps({"resize_exact": (len(results) - len(failed)) / len(results), "cases": len(results),
                      "failed": failed, "seconds": round(time.perf_counter() - started, 1)}), file=sys.__stdout__)


if __name__ == "__main__":
    main()
