"""Preparation from and to S3, against moto's standalone S3 server on loopback."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from stoker.datasets.config import DataConfig
from stoker.datasets.manifest import Manifest
from stoker.datasets.prepare import prepare
from stoker.errors import UserError
from tests.datasets.conftest import keys


def upload_csv(client, bucket, key, rows=300, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=rows), "b": rng.normal(size=rows), "target": [0, 1, 2] * (rows // 3)})
    client.put_object(Bucket=bucket, Key=key, Body=frame.to_csv(index=False).encode())


def test_prepare_from_s3_glob_to_s3_atomically(bucket):
    endpoint, name, client = bucket
    for i in range(2):
        upload_csv(client, name, f"raw/part-{i}.csv", seed=i)
    config = DataConfig(source=f"s3://{name}/raw/*.csv", label="target", output=f"s3://{name}/prepared/ds",
                        rows_per_shard=150, s3={"endpoint_url": endpoint})
    manifest = prepare(config)
    assert sum(s["rows"] for s in manifest.splits.values()) == 600 and manifest.source_files == 2
    listed = keys(client, name, "prepared/")
    assert "prepared/ds/manifest.json" in listed
    assert [k for k in listed if k.startswith("prepared/ds/train/")] == [
        "prepared/ds/train/part-00000.parquet", "prepared/ds/train/part-00001.parquet", "prepared/ds/train/part-00002.parquet"]
    assert not [k for k in listed if ".tmp-" in k]
    again = Manifest.read(f"s3://{name}/prepared/ds", config.s3)
    assert again.source_fingerprint == manifest.source_fingerprint and again.splits == manifest.splits

    # A second prepare replaces the output, leaving no stale shards behind.
    prepare(config.model_copy(update={"rows_per_shard": 1000}))
    assert [k for k in keys(client, name, "prepared/ds/train/")] == ["prepared/ds/train/part-00000.parquet"]


def test_s3_errors_are_one_line(bucket, monkeypatch):
    endpoint, name, client = bucket
    upload_csv(client, name, "raw/in.csv")
    base = {"label": "target", "output": f"s3://{name}/out", "s3": {"endpoint_url": endpoint}}
    with pytest.raises(UserError, match=r"^data.source: s3://no-such-bucket-x/in.csv: "):
        prepare(DataConfig(source="s3://no-such-bucket-x/in.csv", **base))
    with pytest.raises(UserError, match=rf"^data.source: s3://{name}/raw/missing.csv: no such file"):
        prepare(DataConfig(source=f"s3://{name}/raw/missing.csv", **base))
    assert keys(client, name, "out") == []


def test_write_killed_half_way_leaves_nothing_visible(bucket, tmp_path):
    endpoint, name, client = bucket
    upload_csv(client, name, "raw/in.csv", rows=6000)
    script = (
        "from stoker.datasets.config import DataConfig\n"
        "from stoker.datasets.prepare import prepare\n"
        f"prepare(DataConfig(source='s3://{name}/raw/in.csv', label='target', output='s3://{name}/out/ds',\n"
        f"    rows_per_shard=20, s3={{'endpoint_url': '{endpoint}'}}))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    deadline = time.monotonic() + 60
    try:
        # Kill it once some shards are staged but before the commit.
        while len([k for k in keys(client, name, "out/") if ".tmp-" in k]) < 10:
            assert process.poll() is None, "prepare finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert [k for k in keys(client, name, "out/") if k.startswith("out/ds/")] == []
    with pytest.raises(UserError, match="no prepared dataset at"):
        Manifest.read(f"s3://{name}/out/ds", DataConfig(source="x", label="t", output="x", s3={"endpoint_url": endpoint}).s3)


def test_streaming_parquet_from_s3_with_duplicates_spilled_on_s3(bucket, monkeypatch):
    """Parquet read in batches from S3, duplicate hashes spilled next to the S3 output and
    removed afterwards, with the staged output committed atomically."""
    import io

    from stoker.datasets import file_passes

    monkeypatch.setattr(file_passes, "BATCH_ROWS", 64)
    endpoint, name, client = bucket
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"a": rng.integers(0, 30, 900).astype(float), "b": rng.normal(size=900),
                          "target": rng.choice(["x", "y"], 900)})
    frame.loc[rng.random(900) < 0.1, "b"] = 1.0  # rows that repeat
    frame.loc[frame["b"] == 1.0, "a"] = 3.0
    for i in range(3):
        body = io.BytesIO()
        frame.iloc[i * 300:(i + 1) * 300].to_parquet(body)
        client.put_object(Bucket=name, Key=f"raw/p{i}.parquet", Body=body.getvalue())
    config = DataConfig(source=f"s3://{name}/raw/", label="target", output=f"s3://{name}/prepared/dd",
                        duplicates="drop", rows_per_shard=200, s3={"endpoint_url": endpoint})
    manifest = prepare(config)
    assert manifest.dropped["duplicate"] == int(frame.duplicated(subset=["a", "b", "target"]).sum()) > 0
    assert not [k for k in keys(client, name) if ".spill-" in k or ".tmp-" in k]
    assert Manifest.read(f"s3://{name}/prepared/dd", config.s3).splits == manifest.splits
