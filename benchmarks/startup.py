"""Startup overhead of stoker: time from `stoker train` (embedded) and from `stoker submit` (to
a running local cluster) to the first training step, against a hand-written Ray Train +
DeepSpeed script run directly and with `ray job submit`, in the same run, on the same prepared
data (ABBA order, best of `--repeats`).

The first step is timed the same way for all four: a `sitecustomize` probe on PYTHONPATH (set
for the commands and inherited by the local cluster's nodes) wraps DeepSpeed's
`DeepSpeedEngine.step` when that module is imported and writes the wall-clock time at which each
worker's first optimizer step returns. The probe imports nothing heavy itself, so it costs
nothing before then. Time to first step = the last rank's first-step time minus the moment the
command was launched.

Prints one JSON line: train_over_raw, submit_over_raw, the raw seconds to the first step, and
each command's total wall time (one epoch) for context.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml
from digits_project import digits_project

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.local_cluster

RAW_SCRIPT = textwrap.dedent('''
    """A hand-written Ray Train script: what a user would write without stoker."""
    import json
    import os
    import sys

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer


    def loop(cfg):
        import deepspeed
        import ray.train
        import torch

        features = cfg["features"]
        model = torch.nn.Sequential(torch.nn.Linear(len(features), 64), torch.nn.ReLU(), torch.nn.Linear(64, cfg["classes"]))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg["ds_config"])
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=32, dtypes=torch.float32):
            x = torch.stack([batch[f] for f in features], dim=1)
            loss = torch.nn.functional.cross_entropy(engine(x), batch["label"].long())
            engine.backward(loss)
            engine.step()
        ray.train.report({"loss": loss.item()})


    if __name__ == "__main__":
        prepared, storage = sys.argv[1], sys.argv[2]
        cfg = {"features": json.loads(sys.argv[3]), "classes": int(sys.argv[4]), "ds_config": json.loads(sys.argv[5])}
        ray.init(num_cpus=None if "RAY_ADDRESS" in os.environ else 2)
        TorchTrainer(loop, train_loop_config=cfg, datasets={"train": ray.data.read_parquet(prepared + "/train")},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(name=f"raw-{os.getpid()}", storage_path=storage)).fit()
''')


PROBE = textwrap.dedent('''
    """Benchmark probe: the wall time at which this process's first DeepSpeed step returns."""
    import importlib.abc
    import importlib.util
    import os
    import sys
    import time

    OUT = os.environ.get("STOKER_BENCH_FIRST_STEP_DIR")
    TARGET = "deepspeed.runtime.engine"


    def patch(engine_class):
        step = engine_class.step

        def first_step(self, *args, **kwargs):
            result = step(self, *args, **kwargs)
            engine_class.step = step  # only the first one is timed
            with open(os.path.join(OUT, str(os.getpid())), "w") as out:
                out.write(repr(time.time()))
            return result

        engine_class.step = first_step


    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                patch(module.DeepSpeedEngine)

            spec.loader.exec_module = exec_module
            return spec


    if OUT:
        sys.meta_path.insert(0, Finder())
''')


def first_step(command: list[str], cwd: Path, env: dict, stamps: Path) -> tuple[float, float]:
    """(seconds from launch to the last rank's first training step, total seconds)."""
    for old in stamps.iterdir():
        old.unlink()
    launched, started = time.time(), time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    total = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    times = [float(p.read_text()) for p in stamps.iterdir()]
    if len(times) != 2:
        raise SystemExit(f"{command[:4]}: expected the first-step time of 2 workers, got {len(times)} (probe not loaded?)")
    return max(times) - launched, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="measurements per command; the fastest counts")
    parser.add_argument("--materialize", choices=("auto", "always", "never"), default="auto",
                        help="stoker's data.ingest.materialize (auto: small splits are cached before training)")
    args = parser.parse_args()


    from stoker.config import parse_config
    from stoker.datasets.manifest import Manifest
    from stoker.datasets.prepare import prepare
    from tests.local_cluster import LocalCluster

    root, project = digits_project("stkb")
    config = {
        "name": "bench", "storage": str(root / "runs"),
        "data": {"source": "digits.csv", "label": "target", "output": str(root / "prepared"),
                 "ingest": {"materialize": args.materialize}},
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"epochs": 1, "batch_size": 32, "deepspeed": {"zero_stage": 2}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    }
    os.chdir(project)
    prepare(parse_config(config, "bench").data)
    (project / "run.yaml").write_text(yaml.safe_dump(config))
    manifest = Manifest.read(root / "prepared")
    ds_config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "torch_adam": True}}}
    (project / "raw_train.py").write_text(RAW_SCRIPT)
    raw_args = [str(root / "prepared"), str(root / "raw-runs"), json.dumps(manifest.features),
                str(manifest.num_classes), json.dumps(ds_config)]
    probe = root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    stamps = root / "first-steps"
    stamps.mkdir()
    # Set here so the local cluster's nodes (started below from this environment) load the
    # probe in their job workers too.
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_V2_ENABLED="1",
                      STOKER_BENCH_FIRST_STEP_DIR=str(stamps),
                      PYTHONPATH=os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")])))
    os.environ.pop("RAY_ADDRESS", None)
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    best: dict[str, tuple[float, float]] = {}

    def measure(key: str, command: list[str]) -> None:
        result = first_step(command, project, env, stamps)
        best[key] = min(best.get(key, result), result)

    def raw_local() -> None:
        measure("raw_train", [sys.executable, "raw_train.py", *raw_args])

    def stoker_local() -> None:
        measure("stoker_train", [str(bin_dir / "stoker"), "train", "run.yaml", "--fresh", "--name", "bench-local"])

    for repeat in range(args.repeats):
        for run in (raw_local, stoker_local) if repeat % 2 == 0 else (stoker_local, raw_local):
            run()

    with LocalCluster(root / "cluster", num_nodes=1, cpus_per_node=2) as cluster:
        def raw_submit() -> None:
            measure("raw_job_submit", [str(bin_dir / "ray"), "job", "submit", "--address", cluster.address,
                                       "--working-dir", ".", "--", "python", "raw_train.py", *raw_args])

        def stoker_submit() -> None:
            # A new run name each time: resubmitting a name finds its finished job and stops there.
            measure("stoker_submit", [str(bin_dir / "stoker"), "submit", "run.yaml", "--name",
                                      f"bench-submit-{time.monotonic_ns()}", "--address", cluster.address, "--follow"])

        for repeat in range(args.repeats):
            for run in (raw_submit, stoker_submit) if repeat % 2 == 0 else (stoker_submit, raw_submit):
                run()

    print(json.dumps({
        "train_over_raw": round(best["stoker_train"][0] / best["raw_train"][0], 3),
        "submit_over_raw": round(best["stoker_submit"][0] / best["raw_job_submit"][0], 3),
        **{f"{key}_s": round(value[0], 2) for key, value in best.items()},
        **{f"{key}_total_s": round(value[1], 2) for key, value in best.items()},
        "repeats": args.repeats, "materialize": args.materialize,
    }))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
