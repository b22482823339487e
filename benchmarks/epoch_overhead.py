"""Fixed cost around the training pass: `stoker train` on digits (2 workers, ZeRO 2, 20 epochs,
validation and a checkpoint every epoch) against a hand-written Ray Train + DeepSpeed script
doing the same per epoch (train pass, validation pass, DeepSpeed checkpoint, report), in the
same run, on the same prepared data.

Both are timed at the same place: the driver-side moment each epoch's report arrives (Ray
Train's `after_report` callbacks: stoker's TensorBoard event wall times, the raw script's own
callback), and from launch to exit for the whole run.

The pair (raw, then stoker) runs `--repeats` times (3 by default): one run cannot tell noise
from a regression. Prints one JSON line; each figure is the median over the repeats, with
`<key>_runs` (every repeat's value) and `<key>_spread` (max - min) for epoch_wall_over_pass:
- epoch_wall_over_pass: median over epochs of (this epoch's report - the previous one's) /
  this epoch's training pass (`epoch_time_s`); the raw script's figure alongside;
- first_epoch_over_raw: launch to the first epoch's report, stoker / raw;
- total_over_raw: launch to exit, stoker / raw; plus the raw seconds of each;
- fixed_per_epoch_s: where a stoker epoch's time goes, means over epochs (2nd on; means, so
  the parts sum to the gap) of: `gap_s` (report to report), `pass_s`, `validation_s` (evaluation and its metric
  sync, the record's validation_s), `checkpoint_s` (writing the DeepSpeed checkpoint in the
  worker, the record's checkpoint_s) and `report_s`: the rest (the epoch-end collectives,
  `ray.train.report` persisting the checkpoint to storage and its barrier, and the driver's
  handling of the report: metrics.jsonl, TensorBoard, the run records).

The raw script runs with Ray's defaults (what a user would write).

Usage: .venv/bin/python benchmarks/epoch_overhead.py [--epochs 20] [--repeats 3]
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml
from digits_project import digits_project
from flags import OneLineParser, at_least

EPOCHS = 20
REPEATS = 3

RAW_SCRIPT = textwrap.dedent('''
    """A hand-written Ray Train + DeepSpeed script: what a user would write without stoker."""
    import json
    import os
    import sys
    import tempfile
    import time

    import ray
    import ray.train
    from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchTrainer


    class Stamp(UserCallback):
        def __init__(self, path):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as out:
                out.write(json.dumps({"epoch": metrics[0]["epoch"], "pass_s": metrics[0]["pass_s"], "t": time.time()}) + "\\n")


    def loop(cfg):
        import deepspeed
        import torch

        features = cfg["features"]
        model = torch.nn.Sequential(torch.nn.Linear(len(features), 64), torch.nn.ReLU(), torch.nn.Linear(64, cfg["classes"]))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg["ds_config"])
        for epoch in range(cfg["epochs"]):
            started = time.perf_counter()
            for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=32, dtypes=torch.float32):
                x = torch.stack([batch[f] for f in features], dim=1)
                loss = torch.nn.functional.cross_entropy(engine(x), batch["label"].long())
                engine.backward(loss)
                engine.step()
            pass_s = time.perf_counter() - started
            correct = total = 0
            with torch.no_grad():
                for batch in ray.train.get_dataset_shard("validation").iter_torch_batches(batch_size=32, dtypes=torch.float32):
                    x = torch.stack([batch[f] for f in features], dim=1)
                    correct += int((engine(x).argmax(1) == batch["label"].long()).sum())
                    total += len(x)
            with tempfile.TemporaryDirectory() as directory:
                engine.save_checkpoint(directory)
                ray.train.report({"epoch": epoch, "pass_s": pass_s, "val_accuracy": correct / max(total, 1)},
                                 checkpoint=Checkpoint.from_directory(directory))


    if __name__ == "__main__":
        prepared, storage, stamps = sys.argv[1], sys.argv[2], sys.argv[3]
        cfg = {"features": json.loads(sys.argv[4]), "classes": int(sys.argv[5]), "ds_config": json.loads(sys.argv[6]),
               "epochs": int(sys.argv[7])}
        ray.init(num_cpus=2)
        data = {split: ray.data.read_parquet(f"{prepared}/{split}") for split in ("train", "validation")}
        TorchTrainer(loop, train_loop_config=cfg, datasets=data,
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(name=f"raw-{os.getpid()}", storage_path=storage, callbacks=[Stamp(stamps)],
                                          checkpoint_config=CheckpointConfig(num_to_keep=2))).fit()
        ray.shutdown()
''')


def median_ratio(stamps: list[float], passes: list[float]) -> float:
    """Median over epochs 1.. of (report gap / that epoch's pass)."""
    return statistics.median((stamps[i] - stamps[i - 1]) / passes[i] for i in range(1, len(stamps)))


def run(command: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(launch wall-clock time, seconds to exit)."""
    launched, started = time.time(), time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return launched, time.perf_counter() - started


def fixed_per_epoch(stamps: list[float], records: list[dict]) -> dict[str, float]:
    """Means over epochs 1.. of where the report-to-report gap went (see the docstring)."""
    parts: dict[str, list[float]] = {k: [] for k in ("gap_s", "pass_s", "validation_s", "checkpoint_s", "report_s")}
    for i in range(1, len(stamps)):
        gap, record = stamps[i] - stamps[i - 1], records[i]
        known = {"pass_s": record["epoch_time_s"], "validation_s": record.get("validation_s", 0.0),
                 "checkpoint_s": record.get("checkpoint_s", 0.0)}
        for key, value in {"gap_s": gap, **known, "report_s": gap - sum(known.values())}.items():
            parts[key].append(value)
    return {key: round(statistics.mean(values), 4) for key, values in parts.items()}


def main() -> None:
    parser = OneLineParser(prog="benchmarks/epoch_overhead.py", description=__doc__.splitlines()[0])
    # Two epochs at least: the per-epoch figures are gaps between consecutive reports.
    parser.add_argument("--epochs", type=at_least(2), default=EPOCHS)
    parser.add_argument("--repeats", type=at_least(1), default=REPEATS, help="raw + stoker pairs to run")
    args = parser.parse_args()

    from stoker.config import parse_config
    from stoker.datasets.manifest import Manifest
    from stoker.datasets.prepare import prepare

    root, project = digits_project("stke")
    config = {
        "name": "bench", "storage": str(root / "runs"),
        "data": {"source": "digits.csv", "label": "target", "output": str(root / "prepared")},
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"epochs": args.epochs, "batch_size": 32, "deepspeed": {"zero_stage": 2},
                  "checkpoint": {"every": 1}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    }
    os.chdir(project)
    prepare(parse_config(config, "bench").data)
    manifest = Manifest.read(root / "prepared")
    ds_config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "torch_adam": True}}}
    (project / "raw_train.py").write_text(RAW_SCRIPT)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1",
           # The raw script's workers build DeepSpeed's comm extension with the venv's ninja, as
           # stoker's do (stoker.cluster.connect): a system ninja cannot read the venv ninja's build
           # log, and every raw/stoker switch rebuilt it (80-160 s on 2 CPUs, inside first_epoch).
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    runs = [one_pair(root, project, config, manifest, ds_config, env, args.epochs, i) for i in range(args.repeats)]
    summary: dict = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if key == "fixed_per_epoch_s":
            summary[key] = {k: round(statistics.median(v[k] for v in values), 4) for k in values[0]}
            continue
        summary[key] = round(statistics.median(values), 3)
        if key in ("epoch_wall_over_pass", "raw_epoch_wall_over_pass"):
            summary[f"{key}_spread"] = round(max(values) - min(values), 3)
            summary[f"{key}_runs"] = values
    print(json.dumps({**summary, "epochs": args.epochs, "repeats": args.repeats}))
    shutil.rmtree(root, ignore_errors=True)


def one_pair(root: Path, project: Path, config: dict, manifest, ds_config: dict, env: dict, epochs: int,
             repeat: int) -> dict:
    """The raw script, then `stoker train` (a run of its own per repeat): one repeat's figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stoker.trainer.run_dir import METRICS, TENSORBOARD

    raw_stamps = root / f"raw-stamps-{repeat}.jsonl"
    raw_launch, raw_total = run([sys.executable, "raw_train.py", str(root / "prepared"), str(root / "raw-runs"),
                                 str(raw_stamps), json.dumps(manifest.features), str(manifest.num_classes),
                                 json.dumps(ds_config), str(epochs)], project, env)
    raw = [json.loads(line) for line in raw_stamps.read_text().splitlines()]
    name = f"bench{repeat}"
    (project / "run.yaml").write_text(yaml.safe_dump(dict(config, name=name)))
    stoker_bin = Path(sys.executable).parent / "stoker"
    stoker_launch, stoker_total = run([str(stoker_bin), "train", "run.yaml", "--fresh"], project, env)

    run_dir = root / "runs" / name
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    events = EventAccumulator(str(run_dir / TENSORBOARD))
    events.Reload()
    stamps = [e.wall_time for e in events.Scalars("train_loss")]
    assert len(stamps) == len(records) == epochs, (len(stamps), len(records))
    raw_first = raw[0]["t"] - raw_launch
    figures = {
        "epoch_wall_over_pass": round(median_ratio(stamps, [r["epoch_time_s"] for r in records]), 3),
        "raw_epoch_wall_over_pass": round(median_ratio([r["t"] for r in raw], [r["pass_s"] for r in raw]), 3),
        "first_epoch_over_raw": round((stamps[0] - stoker_launch) / raw_first, 3),
        "total_over_raw": round(stoker_total / raw_total, 3),
        "stoker_first_epoch_s": round(stamps[0] - stoker_launch, 2),
        "raw_first_epoch_s": round(raw_first, 2),
        "stoker_total_s": round(stoker_total, 2),
        "raw_total_s": round(raw_total, 2),
        "stoker_median_pass_s": round(statistics.median(r["epoch_time_s"] for r in records), 3),
        "fixed_per_epoch_s": fixed_per_epoch(stamps, records),
    }
    print(f"repeat {repeat}: {figures}", file=sys.stderr, flush=True)
    return figures


if __name__ == "__main__":
    main()
