"""Applying a prepared dataset's fitted transform to new data (`stoker data apply`).

The manifest holds everything: derived-feature expressions, imputation values, scaling
statistics, categories, the vocabulary, image channel statistics. New rows are encoded exactly
as the training split was; unknown categories become all zeros (one-hot) or -1 (ordinal),
unknown tokens the unknown id, unknown labels -1.

It streams, as preparation does: each source file is read as Arrow record batches of
`file_passes.BATCH_ROWS` rows (`file_passes.py`'s readers; a file that cannot stream is read whole), each
batch is encoded and appended to one Parquet writer, and image folders are decoded in chunks of
`images.CHUNK_IMAGES`. Memory is bounded by a batch, whatever the size of the source; the
output is written to a temporary sibling and appears only once complete.
"""

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stoker.datasets import file_passes, images
from stoker.datasets import transform as tf
from stoker.datasets.config import DataConfig, S3Config
from stoker.datasets.io import Rejects, atomic_file, detect_format, read_file, read_images
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, Manifest
from stoker.datasets.storage import SourceFile, list_sources
from stoker.errors import UserError


def apply(prepared: str, source: str, output: str | Path, s3: S3Config | None = None) -> dict:
    """Encode `source` with the transform of the dataset at `prepared`; write one Parquet file.

    Returns a summary: rows written, rows with imputed values, rows with an unknown label.
    """
    s3 = s3 or S3Config()
    manifest = Manifest.read(prepared, s3)
    output = Path(output)
    if output.suffix.lower() not in (".parquet", ".pq"):
        raise UserError(f"{output}: the encoded rows are written as Parquet; name the file *.parquet")
    text = manifest.transform.get("text", {})
    config = DataConfig(
        source=source, output=str(output), label=manifest.label, task=manifest.task,
        text={"column": text.get("column", "text")}, s3=s3,
    )
    files = list_sources(config.sources, config.s3, key="input")
    summary = {"rows": 0, "imputed_rows": 0, "unknown_labels": 0}
    if manifest.modality == "image":
        encoded = _image_tables(files, config, manifest, summary)
    else:
        fmt = detect_format(files, "auto")
        encoded = (_encode(frame, uri, manifest, summary) for frame, uri in _frames(files, fmt, config))
    with atomic_file(output) as tmp:
        _write(encoded, tmp)
    return summary


def _write(tables: Iterator[pa.Table], path: Path) -> None:
    """Append every non-empty table to one Parquet file (a row group each); an empty source
    still gets a file with the columns."""
    writer = empty = None
    try:
        for table in tables:
            if table.num_rows == 0:
                empty = table if empty is None else empty
                continue
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        if writer is None:
            pq.write_table(empty, path)
    finally:
        if writer is not None:
            writer.close()


# ------------------------------------------------------------------------------ tabular, text


def _frames(files: list[SourceFile], fmt: str, config: DataConfig) -> Iterator[tuple[pd.DataFrame, str]]:
    """Every file's rows as pandas frames of at most BATCH_ROWS rows, in order, with the file
    they came from; every file must have the first one's columns (as when read whole)."""
    first: pa.Schema | None = None
    for index, item in enumerate(files):
        checked = False
        for table in _file_tables(item, index, fmt, config):
            if first is None:
                first = table.schema
            elif index > 0 and not checked:
                _same_schema(first, table.schema, item, files[0])
                checked = True
            yield table.to_pandas(), item.uri


def _file_tables(item: SourceFile, index: int, fmt: str, config: DataConfig) -> Iterator[pa.Table]:
    """One file as tables of at most BATCH_ROWS rows. A file that turns out not to stream (a
    ragged row, an invalid JSON line, a type that changes after the first block) is read whole
    from there on: its first rows are already encoded, so they are skipped; the whole-file
    parser yields the same rows in the same order, or fails naming the bad one."""
    # batch_rows is read now, not at import: tests shrink it to stream small data.
    plan = file_passes.Plan.reading(fmt, config, item.uri, batch_rows=file_passes.BATCH_ROWS)
    rejects = Rejects(quarantine=False)  # a bad record fails the command, naming its file and row
    done = 0
    try:
        for table in file_passes.file_tables(item, index, plan, rejects):
            done += table.num_rows
            yield table
    except file_passes.NotStreamable:
        tables = file_passes.file_tables(item, index, replace(plan, whole=frozenset({index})), rejects)
        for table in tables:
            skip = min(done, table.num_rows)
            done -= skip
            if skip < table.num_rows:
                yield table.slice(skip)
        return
    if done == 0:
        # No batch at all (a header-only CSV, an empty Parquet file): the whole (empty) table
        # still carries the columns, so an empty source writes a file with the right ones.
        yield read_file(item, fmt, config, rejects)


def _same_schema(first: pa.Schema, schema: pa.Schema, item: SourceFile, first_file: SourceFile) -> None:
    """The check `io.combine_tables` makes when files are read whole: the same columns, and
    types that combine (int64 and double do; int64 and string do not)."""
    if set(schema.names) != set(first.names):
        extra = sorted(set(schema.names) ^ set(first.names))
        raise UserError(f"{item.uri}: files have different schemas: column {extra[0]!r} is in only one of "
                        f"{item.uri} and {first_file.uri}")
    try:
        pa.unify_schemas([first, schema], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"{first_file.uri}: files have different schemas: {exc}") from None


def _encode(frame: pd.DataFrame, uri: str, manifest: Manifest, summary: dict) -> pa.Table:
    """One batch of a tabular or text source, encoded; adds its counts to `summary`."""
    transform = manifest.transform
    if manifest.modality == "text":
        column = transform["text"]["column"]
        if column not in frame.columns:
            raise UserError(f"{uri}: column {column!r} (data.text.column) is missing")
        ids = tf.apply_text(frame[column].tolist(), transform["text"])
        columns = {FEATURES_COLUMN: tf.list_column(ids, pa.int32())}
    else:
        frame = tf.add_derived(frame, transform.get("derived", {}))
        needed = [*transform["numeric"], *transform["categorical"]]
        absent = [c for c in needed if c not in frame.columns]
        if absent:
            raise UserError(f"{uri}: column {absent[0]!r} is missing (the training data had it)")
        columns = tf.apply_tabular(frame, transform)
        # Rows the training data would have dropped cannot be dropped at inference: a
        # missing number becomes the training mean (0 after standardising).
        if transform["numeric"]:
            gaps = np.column_stack([np.isnan(columns[c]) for c in transform["numeric"]])
            summary["imputed_rows"] += int(gaps.any(axis=1).sum())
            for column, stats in transform["numeric"].items():
                values = columns[column]
                values[np.isnan(values)] = _encoded_mean(stats, transform.get("scale", "standard"))
    if manifest.label and manifest.label in frame.columns:
        columns[LABEL_COLUMN] = _encode_labels(frame[manifest.label], manifest, summary)
    summary["rows"] += len(frame)
    return pa.table(columns)


# ------------------------------------------------------------------------------------ images


def _image_tables(files: list[SourceFile], config: DataConfig, manifest: Manifest, summary: dict) -> Iterator[pa.Table]:
    """Image folders decoded and encoded `images.CHUNK_IMAGES` files at a time."""
    rejects = Rejects(quarantine=False)  # an image that does not decode fails, naming it
    for start in range(0, max(len(files), 1), images.CHUNK_IMAGES):
        _, class_names, pixels = read_images(files[start:start + images.CHUNK_IMAGES], config, rejects)
        features = tf.apply_image(pixels, manifest.transform["image"])
        columns = {FEATURES_COLUMN: tf.list_column(features, pa.float32()),
                   LABEL_COLUMN: _encode_labels(pd.Series(class_names, dtype=object), manifest, summary)}
        summary["rows"] += len(class_names)
        yield pa.table(columns)


# ------------------------------------------------------------------------------------ labels


def _encode_labels(labels: pd.Series, manifest: Manifest, summary: dict) -> np.ndarray:
    """Class ids (-1 for a class training never saw, counted in `summary`), or regression
    targets as float32."""
    if manifest.classes is None:
        return pd.to_numeric(labels, errors="coerce").to_numpy(np.float32)
    index = {str(c): i for i, c in enumerate(manifest.classes)}
    encoded = _label_strings(labels, manifest.classes).map(index).astype("float64").fillna(-1).to_numpy(np.int64)
    summary["unknown_labels"] += int((encoded < 0).sum())
    return encoded


def _label_strings(labels: pd.Series, classes: list) -> pd.Series:
    """Labels as the strings the classes are keyed by. An integer label column with a missing
    value reads as floats (1.0); with integer classes those are the integers they hold, so a
    label's id does not depend on whether its batch had a gap."""
    strings = labels.astype("string")
    integer_classes = any(isinstance(c, int) and not isinstance(c, bool) for c in classes)
    if integer_classes and pd.api.types.is_float_dtype(labels):
        whole = labels.notna() & np.isfinite(labels) & (labels % 1 == 0) & (labels.abs() < 2**53)
        if whole.any():
            strings = strings.mask(whole, labels.where(whole).astype("Int64").astype("string"))
    return strings


def _encoded_mean(stats: dict, scale: str) -> float:
    if scale == "standard":
        return 0.0
    if scale == "minmax" and stats["min"] is not None:
        span = stats["max"] - stats["min"]
        return (stats["mean"] - stats["min"]) / (span if span > 0 else 1.0)
    return stats["mean"]
