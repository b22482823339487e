"""The per-row work of preparation as Ray tasks (`data.engine: ray`), for tabular sources.

What runs on the cluster: parsing every input file (one task per file, where its bytes are
read), and encoding plus writing every output shard (one task per shard: the fitted transform,
label codes, Parquet write). What stays on the driver: the decisions that need every row at
once and are cheap next to parsing and encoding (column kinds, the cleaning masks, duplicate
removal, the seeded and stratified split) and fitting the statistics on the training split,
exactly as the local engine does them, so both engines write the same shards and manifest.

Errors a task finds in the data come back as the same one-line `UserError` the local engine
raises (returned as values, so Ray does not wrap them in a `RayTaskError`).
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from stoker.datasets import transform as tf
from stoker.datasets.config import DataConfig
from stoker.datasets.io import Rejects, combine_tables, read_file
from stoker.datasets.manifest import LABEL_COLUMN
from stoker.datasets.storage import SourceFile, Staging
from stoker.errors import UserError


def require_ray() -> None:
    if not ray.is_initialized():
        raise UserError("data.engine: ray needs a Ray cluster; connect first (the CLI does) or use engine: local")


@ray.remote
def _read(item: SourceFile, fmt: str, config: DataConfig) -> tuple:
    rejects = Rejects(quarantine=config.bad_records == "quarantine")
    try:
        return read_file(item, fmt, config, rejects), rejects.records, None
    except UserError as exc:
        return None, None, str(exc)


def read_tables(
    files: list[SourceFile], fmt: str, config: DataConfig, rejects: Rejects,
    on_file: Callable[[SourceFile, int], None] | None = None,
) -> pa.Table:
    """`io.read_tables` with one Ray task per file; errors name the first bad file in order."""
    require_ray()
    refs = [_read.remote(item, fmt, config) for item in files]
    tables = []
    for item, ref in zip(files, refs, strict=True):
        table, records, error = ray.get(ref)
        if error is not None:
            for other in refs:
                ray.cancel(other)
            raise UserError(error)
        rejects.records.extend(records)
        tables.append((item, table))
        if on_file:
            on_file(item, table.num_rows)
    return combine_tables(tables)


@ray.remote
def _encode_and_write(part: pd.DataFrame, labels: np.ndarray, transform: dict, staging: Staging,
                      name: str) -> int:
    columns = tf.apply_tabular(part, transform)
    columns[LABEL_COLUMN] = labels
    table = pa.table(columns)
    if staging.local:
        Path(staging.path(name)).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, staging.path(name))
    else:
        with staging.open(name) as handle:
            pq.write_table(table, handle)
    return int(table.nbytes)


def write_split(part: pd.DataFrame, labels: np.ndarray, transform: dict, staging: Staging, split: str,
                rows_per_shard: int) -> tuple[list[str], int]:
    """Encode and write one split's shards as Ray tasks; returns (shard names, bytes)."""
    require_ray()
    transform_ref = ray.put(transform)
    names, refs = [], []
    for index, start in enumerate(range(0, max(len(part), 1), rows_per_shard)):
        name = f"{split}/part-{index:05d}.parquet"
        refs.append(_encode_and_write.remote(part.iloc[start:start + rows_per_shard],
                                             labels[start:start + rows_per_shard], transform_ref, staging, name))
        names.append(name)
    return names, sum(ray.get(refs))
