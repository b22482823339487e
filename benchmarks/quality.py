"""Model quality: stoker's default MLP (README-style config) against scikit-learn's linear
baselines fitted on the same prepared splits, on every classification and regression dataset
bundled with scikit-learn (iris, wine, breast_cancer, digits; diabetes).

Score: test accuracy (classification, against LogisticRegression) or test R2 (regression,
against Ridge). stoker's figure is the run's reported test metric of its best epoch.

Prints one JSON line: {"datasets": [{dataset, task, stoker, baseline, ratio}], "min_ratio"}.
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DATASETS = {"iris": "classification", "wine": "classification", "breast_cancer": "classification",
            "digits": "classification", "diabetes": "regression"}


def split_arrays(prepared: str, split: str):
    import pyarrow.parquet as pq

    from stoker.datasets.manifest import LABEL_COLUMN, Manifest

    manifest = Manifest.read(prepared)
    table = pq.read_table([f"{prepared}/{name}" for name in manifest.splits[split]["files"]])
    x = np.stack([table[f].to_numpy() for f in manifest.features], axis=1).astype(np.float64)
    return x, table[LABEL_COLUMN].to_numpy()


def baseline(prepared: str, task: str) -> float:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import accuracy_score, r2_score

    x, y = split_arrays(prepared, "train")
    xt, yt = split_arrays(prepared, "test")
    if task == "classification":
        return float(accuracy_score(yt, LogisticRegression(max_iter=5000).fit(x, y).predict(xt)))
    return float(r2_score(yt, Ridge().fit(x, y).predict(xt)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import sklearn.datasets

    from stoker.cluster.connect import connect_embedded
    from stoker.config import parse_config
    from stoker.datasets.prepare import prepare
    from stoker.trainer.run import train

    root = Path(tempfile.mkdtemp(prefix="stkq", dir="/tmp"))
    connect_embedded(num_cpus=2)
    rows = []
    try:
        for name in args.datasets.split(","):
            task = DATASETS[name]
            raw = root / f"{name}.csv"
            getattr(sklearn.datasets, f"load_{name}")(as_frame=True).frame.to_csv(raw, index=False)
            config = {
                "name": name, "storage": str(root / "runs"),
                "data": {"source": str(raw), "label": "target", "task": task, "output": str(root / "prepared" / name),
                         "split": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 0,
                                   "stratify": task == "classification"}},
                "model": {"name": "mlp", "hidden": [128, 64], "dropout": 0.1},
                "train": {"epochs": args.epochs, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003},
                          "schedule": {"name": "warmup_cosine", "warmup_steps": 20},
                          "deepspeed": {"zero_stage": 2}, "checkpoint": {"every": 10}},
                "scaling": {"num_workers": 2},
            }
            run = parse_config(config, "quality")
            prepare(run.data)
            result = train(run)
            score = result.test["accuracy" if task == "classification" else "r2"]
            base = baseline(run.data.output, task)
            rows.append({"dataset": name, "task": task, "stoker": round(score, 4), "baseline": round(base, 4),
                         "ratio": round(score / base, 3) if base else None})
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"datasets": rows, "min_ratio": min(r["ratio"] for r in rows if r["ratio"] is not None),
                      "epochs": args.epochs}))


if __name__ == "__main__":
    main()
