"""Startup overhead of stoker: `stoker train` (embedded) and `stoker submit` (to a running local
cluster) against a hand-written Ray Train + DeepSpeed script run directly and with `ray job
submit`, in the same run, on the same prepared data. Each measurement is the wall time of a
one-epoch run over a small dataset, so it is dominated by the time to the first training step
(cluster start or job start, dataset read, worker group, DeepSpeed/gloo init).

Prints one JSON line: train_over_raw, submit_over_raw and the raw seconds.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

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
                     run_config=RunConfig(name="raw", storage_path=storage)).fit()
''')


def timed(command: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    from sklearn.datasets import load_digits

    from stoker.cluster.local import LocalCluster
    from stoker.config import parse_config
    from stoker.datasets.manifest import Manifest
    from stoker.datasets.prepare import prepare

    root = Path(tempfile.mkdtemp(prefix="stkb", dir="/tmp"))
    project = root / "project"
    project.mkdir()
    load_digits(as_frame=True).frame.to_csv(project / "digits.csv", index=False)
    config = {
        "name": "bench", "storage": str(root / "runs"),
        "data": {"source": "digits.csv", "label": "target", "output": str(root / "prepared")},
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
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1"}
    env.pop("RAY_ADDRESS", None)
    bin_dir = Path(sys.executable).parent

    raw_local = timed([sys.executable, "raw_train.py", *raw_args], project, env)
    stoker_local = timed([str(bin_dir / "stoker"), "train", "run.yaml", "--name", "bench-local"], project, env)

    with LocalCluster(root / "cluster", num_nodes=1, cpus_per_node=2) as cluster:
        raw_submit = timed([str(bin_dir / "ray"), "job", "submit", "--address", cluster.address, "--working-dir", ".",
                            "--", "python", "raw_train.py", *raw_args], project, env)
        stoker_submit = timed([str(bin_dir / "stoker"), "submit", "run.yaml", "--name", "bench-submit",
                               "--address", cluster.address, "--follow"], project, env)

    print(json.dumps({
        "train_over_raw": round(stoker_local / raw_local, 3),
        "submit_over_raw": round(stoker_submit / raw_submit, 3),
        "stoker_train_s": round(stoker_local, 2), "raw_train_s": round(raw_local, 2),
        "stoker_submit_s": round(stoker_submit, 2), "raw_job_submit_s": round(raw_submit, 2),
    }))


if __name__ == "__main__":
    main()
