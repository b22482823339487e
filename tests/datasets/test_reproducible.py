"""Same config, seed and prepared data, same rows per rank: also when the prepared folder lies
elsewhere (issue 23: the visit log's re-sampling drew other rows in every fresh benchmark folder,
so its test ROC AUC spread over 0.81-0.85 between runs of one config)."""

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray.data

from stoker.datasets.config import DataConfig, S3Config
from stoker.datasets.ingest import ROW_HASH_COLUMN, _md5_seed, _mix, _PortableRowHash, split_files
from stoker.datasets.manifest import Manifest
from stoker.datasets.prepare import prepare
from tests.datasets.test_ingest import _feed, many_blocks  # noqa: F401 (a fixture)


@pytest.mark.usefixtures("many_blocks")
def test_balanced_draws_do_not_depend_on_where_the_prepared_folder_lies(ray_cluster, tmp_path):
    pd.DataFrame({"u": np.arange(1200.0), "target": ["a"] * 1000 + ["b"] * 200}).to_csv(tmp_path / "n.csv", index=False)
    prepare(DataConfig(source=str(tmp_path / "n.csv"), label="target", output=str(tmp_path / "p"),
                       rows_per_shard=100, scale="none"))
    shutil.copytree(tmp_path / "p", tmp_path / "moved" / "elsewhere")
    # Materialised (read by Ray's tasks for the row hashes) and streamed every epoch.
    for materialize in ("always", "never"):
        here, there = (_feed(folder, 3, 2, materialize=materialize, resample="balance")
                       for folder in (tmp_path / "p", tmp_path / "moved" / "elsewhere"))
        assert here == there, materialize  # the same draws, blocks and ranks

    # Ray's row hash, taken back to (file, position) and keyed on the file's name in the folder.
    paths, _ = split_files(tmp_path / "p", "train", Manifest.read(tmp_path / "p"))
    raw = ray.data.read_parquet(paths, include_row_hash=True)
    keyed = pd.concat([_PortableRowHash(paths)(b).to_pandas() for b in raw.iter_batches(batch_format="pyarrow")])
    expected = {}
    for file in sorted((tmp_path / "p" / "train").glob("*.parquet")):
        u = pq.read_table(file)["u"].to_numpy()
        hashes = _mix(np.uint64(_md5_seed(f"train/{file.name}")) + np.arange(len(u), dtype=np.uint64))
        expected.update(zip(u.tolist(), hashes.tolist(), strict=True))
    assert dict(zip(keyed["u"].tolist(), keyed[ROW_HASH_COLUMN].tolist(), strict=True)) == expected


def test_row_hashes_of_a_split_on_s3_are_keyed_as_on_disk(ray_cluster, bucket, tmp_path):
    endpoint, name, client = bucket
    frame = pd.DataFrame({"u": np.arange(600.0), "target": ["a"] * 500 + ["b"] * 100})
    client.put_object(Bucket=name, Key="raw/n.csv", Body=frame.to_csv(index=False).encode())
    s3 = S3Config(endpoint_url=endpoint)
    prefix = f"s3://{name}/prepared/moved"
    prepare(DataConfig(source=f"s3://{name}/raw/n.csv", label="target", output=prefix, rows_per_shard=100,
                       scale="none", s3=s3))
    manifest = Manifest.read(prefix, s3)
    paths, filesystem = split_files(prefix, "train", manifest, s3)
    raw = ray.data.read_parquet(paths, filesystem=filesystem, include_row_hash=True)
    keyed = pd.concat([_PortableRowHash(paths)(b).to_pandas() for b in raw.iter_batches(batch_format="pyarrow")])
    expected = {}
    for path in paths:
        u = pq.read_table(path, filesystem=filesystem)["u"].to_numpy()
        relative = "/".join(path.rsplit("/", 2)[-2:])
        expected.update(zip(u.tolist(), _mix(np.uint64(_md5_seed(relative)) + np.arange(len(u), dtype=np.uint64)).tolist(),
                            strict=True))
    assert len(paths) > 1 and dict(zip(keyed["u"].tolist(), keyed[ROW_HASH_COLUMN].tolist(), strict=True)) == expected
