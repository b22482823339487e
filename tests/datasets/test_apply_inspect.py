"""`stoker data apply` (the saved transform on new data) and `stoker data inspect`."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from stoker.datasets.config import DataConfig
from stoker.datasets.prepare import prepare


def stoker(*args):
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True, timeout=120)


def test_apply_reproduces_training_encoding_and_handles_unknowns(tmp_path):
    rng = np.random.default_rng(0)
    raw = pd.DataFrame({"x": rng.normal(3, 2, 300), "colour": ["red", "green", "blue"] * 100,
                        "target": ["no", "yes", "yes"] * 100})
    raw.to_csv(tmp_path / "raw.csv", index=False)
    manifest = prepare(DataConfig(source=str(tmp_path / "raw.csv"), label="target", output=str(tmp_path / "out"),
                                  derived={"x2": "x * x"}))
    new = raw.iloc[:4].copy()
    new.loc[new.index[1], "colour"] = "purple"  # never seen in training
    new.loc[new.index[2], "x"] = np.nan
    new.loc[new.index[3], "target"] = "maybe"
    new.to_csv(tmp_path / "new.csv", index=False)

    result = stoker("data", "apply", str(tmp_path / "out"), str(tmp_path / "new.csv"), str(tmp_path / "enc.parquet"))
    assert result.returncode == 0, result.stderr
    assert '"rows": 4, "imputed_rows": 1, "unknown_labels": 1' in result.stdout
    encoded = pq.read_table(tmp_path / "enc.parquet").to_pandas()
    assert list(encoded.columns) == [*manifest.features, "label"]
    stats = manifest.transform["numeric"]["x"]
    assert encoded["x"].iloc[0] == np.float32((raw["x"].iloc[0] - stats["mean"]) / stats["std"])
    x2 = manifest.transform["numeric"]["x2"]
    assert abs(encoded["x2"].iloc[0] - (raw["x"].iloc[0] ** 2 - x2["mean"]) / x2["std"]) < 1e-5
    assert encoded.loc[1, ["colour=blue", "colour=green", "colour=red"]].sum() == 0
    assert encoded["x"].iloc[2] == 0.0  # the training mean, standardised
    assert encoded["label"].tolist() == [0, 1, 1, -1]

    bad = stoker("data", "apply", str(tmp_path / "out"), str(tmp_path / "raw.csv"), str(tmp_path / "enc.csv"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "name the file *.parquet" in bad.stderr


def test_inspect_prints_splits_columns_and_bias_warning(tmp_path):
    raw = pd.DataFrame({"x": np.arange(330.0), "target": ["big"] * 300 + ["small"] * 30})
    raw.to_csv(tmp_path / "raw.csv", index=False)
    prepare(DataConfig(source=str(tmp_path / "raw.csv"), label="target", output=str(tmp_path / "out"),
                       imbalance_warning_ratio=4))
    result = stoker("data", "inspect", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # Each class's split sizes are within one row of 70/15/15: 210 + 21 training rows.
    assert "231 rows" in out and "big=210, small=21" in out and "imbalance 10.0" in out
    assert "warning: train: class 'small' is under-represented: 21 rows vs 210" in out
    assert "x  " in out and "median 1" in out
    missing = stoker("data", "inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "run `stoker data prepare CONFIG` first" in missing.stderr


def test_data_examples_parse():
    from pathlib import Path

    import yaml

    from stoker.config import parse_config

    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("data-*.yaml"))
    assert len(examples) >= 4
    for path in examples:
        parse_config(yaml.safe_load(path.read_text()), path.name)
