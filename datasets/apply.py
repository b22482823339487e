"""Applying a prepared dataset's fitted transform to new data (`stoker data apply`).

The manifest holds everything: derived-feature expressions, imputation values, scaling
statistics, categories, the vocabulary, image channel statistics. New rows are encoded exactly
as the training split was; unknown categories become all zeros (one-hot) or -1 (ordinal),
unknown tokens the unknown id, unknown labels -1.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stoker.datasets import transform as tf
from stoker.datasets.config import DataConfig, S3Config
from stoker.datasets.io import Rejects, atomic_file, detect_format, read_images, read_tables
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, Manifest
from stoker.datasets.prepare import _list_column
from stoker.datasets.storage import list_sources
from stoker.errors import UserError


def apply(prepared: str, source: str, output: str | Path, s3: dict | None = None) -> dict:
    """Encode `source` with the transform of the dataset at `prepared`; write one Parquet file.

    Returns a summary: rows written, rows with imputed values, rows with an unknown label.
    """
    manifest = Manifest.read(prepared, S3Config.model_validate(s3 or {}))
    output = Path(output)
    if output.suffix.lower() not in (".parquet", ".pq"):
        raise UserError(f"{output}: the encoded rows are written as Parquet; name the file *.parquet")
    text = manifest.transform.get("text", {})
    config = DataConfig(
        source=source, output=str(output), label=manifest.label, task=manifest.task,
        text={"column": text.get("column", "text")}, s3=s3 or {},
    )
    files = list_sources(config.sources, config.s3, key="input")
    fmt = "images" if manifest.modality == "image" else detect_format(files, "auto")
    rejects = Rejects(quarantine=False)
    summary = {"rows": 0, "imputed_rows": 0, "unknown_labels": 0}
    labels = None
    if manifest.modality == "image":
        _, class_names, pixels = read_images(files, config, rejects)
        columns = {FEATURES_COLUMN: _list_column(tf.apply_image(pixels, manifest.transform["image"]), pa.float32())}
        labels = pd.Series(class_names)
    else:
        frame = read_tables(files, fmt, config, rejects).to_pandas()
        if manifest.modality == "text":
            if text["column"] not in frame.columns:
                raise UserError(f"{source}: column {text['column']!r} (data.text.column) is missing")
            ids = tf.apply_text(frame[text["column"]].tolist(), text)
            columns = {FEATURES_COLUMN: _list_column(ids, pa.int32())}
        else:
            frame = tf.add_derived(frame, manifest.transform.get("derived", {}))
            needed = [*manifest.transform["numeric"], *manifest.transform["categorical"]]
            absent = [c for c in needed if c not in frame.columns]
            if absent:
                raise UserError(f"{source}: column {absent[0]!r} is missing (the training data had it)")
            columns = tf.apply_tabular(frame, manifest.transform)
            # Rows the training data would have dropped cannot be dropped at inference: a
            # missing number becomes the training mean (0 after standardising).
            matrix = np.column_stack([columns[c] for c in manifest.transform["numeric"]]) if manifest.transform["numeric"] else None
            if matrix is not None:
                gaps = np.isnan(matrix)
                summary["imputed_rows"] = int(gaps.any(axis=1).sum())
                for column, stats in manifest.transform["numeric"].items():
                    values = columns[column]
                    values[np.isnan(values)] = _encoded_mean(stats, manifest.transform.get("scale", "standard"))
        if manifest.label and manifest.label in frame.columns:
            labels = frame[manifest.label]
    if labels is not None:
        if manifest.classes is not None:
            index = {str(c): i for i, c in enumerate(manifest.classes)}
            encoded = labels.astype("string").map(index).astype("float64").fillna(-1).to_numpy(np.int64)
            summary["unknown_labels"] = int((encoded < 0).sum())
            columns[LABEL_COLUMN] = encoded
        else:
            columns[LABEL_COLUMN] = pd.to_numeric(labels, errors="coerce").to_numpy(np.float32)
    table = pa.table(columns)
    summary["rows"] = table.num_rows
    with atomic_file(output) as tmp:
        pq.write_table(table, tmp)
    return summary


def _encoded_mean(stats: dict, scale: str) -> float:
    if scale == "standard":
        return 0.0
    if scale == "minmax" and stats["min"] is not None:
        span = stats["max"] - stats["min"]
        return (stats["mean"] - stats["min"]) / (span if span > 0 else 1.0)
    return stats["mean"]
