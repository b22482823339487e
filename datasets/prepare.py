"""Raw files -> cleaned, encoded, split Parquet shards plus manifest.json.

Every statistic (imputation values, scaling, categories, vocabulary, image channel means) is fit
on the training split only and saved in the manifest, so validation and test rows never leak
into training and the same transform can be applied to new data later (`apply.py`).

Two engines (`data.engine`). `local` runs in this process on pyarrow + numpy (multi-threaded
readers and writers): on one machine it is the fastest, with no per-block serialisation
through the object store. `ray` (tabular sources) parses each input file and encodes and
writes each output shard in Ray tasks (`engine.py`), so the heavy per-row work spreads over a
cluster. Either way the driver makes the decisions that need all rows (column kinds, cleaning
masks, duplicates, the stratified split) and fits the statistics on the training split, with
the same code, so the two engines write identical shards and manifests.
"""

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stoker import __version__
from stoker.datasets import transform as tf
from stoker.datasets.config import DataConfig
from stoker.datasets.io import Rejects, detect_format, read_images, read_tables, where
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, MANIFEST, SPLITS, Manifest
from stoker.datasets.progress import Progress
from stoker.datasets.report import class_balance, column_distributions
from stoker.datasets.split import split_positions
from stoker.datasets.storage import Staging, atomic_output, fingerprint, list_sources
from stoker.errors import UserError


@dataclass
class _Encoded:
    """A prepared dataset before it is written."""

    modality: str
    tables: dict[str, pa.Table] | None
    """Encoded splits; None when the shards are encoded as they are written (`deferred`)."""
    features: list[str]
    input_shape: list[int]
    transform: dict
    classes: list | None
    label: str | None
    report: dict
    vocab_size: int | None = None
    labels: dict[str, np.ndarray] | None = None
    """Encoded labels per split (class counts); from `tables` when those exist."""
    deferred: dict[str, pd.DataFrame] | None = None
    """Cleaned, split, not yet encoded rows per split (engine: ray encodes them per shard)."""


def prepare(config: DataConfig, progress: Callable[[str], None] | None = None) -> Manifest:
    """Prepare the dataset described by `config` and return its manifest.

    `progress` receives a line now and then on long preparations (files, rows, throughput).
    """
    files = list_sources(config.sources, config.s3)
    fmt = detect_format(files, config.format)
    tracker = Progress(progress, total_files=len(files))
    rejects = Rejects(quarantine=config.bad_records == "quarantine")
    dropped: Counter[str] = Counter()
    source = config.sources[0] if len(config.sources) == 1 else ", ".join(config.sources)

    if fmt == "images":
        paths, class_names, pixels = read_images(files, config, rejects, tracker.file_read)
        tracker.stage("read")
        encoded = _images(paths, class_names, pixels, config, source)
    else:
        per_file: list[tuple[str, int]] = []

        def on_file(item, rows: int) -> None:
            per_file.append((item.uri, rows))
            tracker.file_read(item, rows)

        reader = read_tables
        if config.engine == "ray" and fmt != "text":
            from stoker.datasets import engine

            reader = engine.read_tables
        table = reader(files, fmt, config, rejects, on_file)
        tracker.stage("read")
        frame = table.to_pandas()
        del table
        if frame.empty:
            raise UserError(f"data.source: {source}: no rows")
        locate = _locator(per_file, fmt)
        text_input = fmt == "text" or config.task == "language_modeling" or (
            config.text.column in frame.columns and config.features is None
            and _is_text(frame[config.text.column])
        )
        if text_input:
            encoded = _text(frame, config, source, dropped)
        else:
            encoded = _tabular(frame, config, source, dropped, locate)
    tracker.stage("transform")

    rows = sum(len(v) for v in encoded.labels.values()) if encoded.labels else sum(
        t.num_rows for t in encoded.tables.values())
    manifest = Manifest(
        stoker_version=__version__,
        source=source,
        source_fingerprint=fingerprint(files, config.s3),
        task=config.task,
        label=encoded.label,
        classes=encoded.classes,
        features=encoded.features,
        transform=encoded.transform,
        dropped=dict(dropped),
        splits={},
        modality=encoded.modality,
        input_shape=encoded.input_shape,
        vocab_size=encoded.vocab_size,
        rejected=rejects.counts(),
        report=encoded.report,
        warnings=encoded.report.pop("warnings", []),
        source_format=fmt,
        source_files=len(files),
    )
    with atomic_output(config.output, config.s3, MANIFEST) as staging:
        for name in SPLITS:
            if encoded.deferred is not None:
                from stoker.datasets import engine

                part, labels = encoded.deferred[name], encoded.labels[name]
                row_bytes = 4 * len(encoded.features) + labels.dtype.itemsize  # float32 features
                files, size = engine.write_split(part, labels, encoded.transform, staging, name,
                                                 _rows_per_shard(len(part), row_bytes * len(part), config))
                manifest.splits[name] = {"rows": len(part), "bytes": size, "files": files}
            else:
                table = encoded.tables[name]
                manifest.splits[name] = {
                    "rows": table.num_rows,
                    "bytes": int(table.nbytes),
                    "files": _write_shards(table, staging, name, _rows_per_shard(table.num_rows, table.nbytes, config)),
                }
            manifest.splits[name]["class_counts"] = _counts(_labels_of(encoded, name), encoded.classes)
        if rejects.records:
            with staging.open("rejected/rejected.jsonl") as handle:
                handle.write("".join(json.dumps(r) + "\n" for r in rejects.records).encode())
        with staging.open(MANIFEST) as handle:
            handle.write(manifest.to_json().encode())
    tracker.stage("write")
    manifest.report["timing"] = {
        "seconds": round(tracker.elapsed(), 3),
        "rows_per_s": round(rows / max(tracker.elapsed(), 1e-9), 1),
        "stages": {k: round(v, 3) for k, v in tracker.stages.items()},
    }
    return manifest


# ----------------------------------------------------------------------------------- tabular


def _tabular(frame: pd.DataFrame, config: DataConfig, source: str, dropped: Counter, locate) -> _Encoded:
    label = config.label
    if label is None:
        raise UserError(f"data.label: required for task {config.task} (name the target column)")
    if label not in frame.columns:
        raise UserError(f"data.label: column {label!r} is not in {source} (columns: {column_list(frame.columns)})")
    group = config.split.group_by
    if group is not None and group not in frame.columns:
        raise UserError(f"data.split.group_by: column {group!r} is not in {source}")
    frame = tf.add_derived(frame, config.derived)
    features = list(config.features) if config.features else [
        c for c in frame.columns if c not in (label, group) and c not in config.derived
    ]
    features += [d for d in config.derived if d not in features]
    missing_cols = [c for c in features if c not in frame.columns]
    if missing_cols:
        raise UserError(f"data.features: column {missing_cols[0]!r} is not in {source}")
    if not features:
        raise UserError(f"data.features: {source} has no feature columns besides the label")
    frame = _na_values_missing(frame, config.na_values)
    categorical = _categorical_columns(frame, features, config.categorical)
    numeric = [c for c in features if c not in categorical]
    policies = _policies(config, features)

    # Type coercion: a numeric value that does not parse, or is infinite, fails or loses its row.
    checked = list(numeric)
    if config.task == "regression":
        if not pd.api.types.is_numeric_dtype(frame[label]):
            raise UserError(f"data.label: column {label!r} is not numeric, so task cannot be regression")
        checked.append(label)
    frame = _finite_numbers(frame, checked, config, dropped, locate, source)

    frame = _drop(frame, frame[label].isna(), "missing_label", dropped,
                  f"data.label: column {label!r} has no value in any row of {source}")
    if config.duplicates == "drop":
        frame = _drop(frame, frame.duplicated(subset=[*features, label]), "duplicate", dropped)
    drop_columns = [c for c in features if policies[c] == "drop"]
    if drop_columns:
        frame = _drop(frame, frame[drop_columns].isna().any(axis=1), "missing_value", dropped,
                      f"data.missing: every row was dropped (missing_value): each misses a value in one of "
                      f"{column_list(drop_columns)}; impute instead of dropping (data.missing: mean, "
                      "median, mode or constant)")
    if len(frame) < 3:
        raise UserError(f"{source}: only {len(frame)} rows left after cleaning; need at least 3 to split")

    positions = split_positions(
        frame[label], frame[group] if group else None, config.split,
        stratify=config.task == "classification" and config.split.stratify,
    )
    parts = {name: frame.iloc[index] for name, index in positions.items()}
    train = parts["train"]
    transform = tf.fit_tabular(train, numeric, categorical, policies, config.fill_value,
                               config.scale, config.encoding, config.derived)
    classes = _classes(parts, label, config)
    labels = {name: _encode_labels(part[label], classes) for name, part in parts.items()}
    report = {"columns": column_distributions(train, numeric, categorical)}
    report = _with_balance(report, labels, classes, config)
    if config.engine == "ray":
        # Encoding is per row: each shard's Ray task applies the transform as it writes.
        feature_names = list(tf.apply_tabular(train.head(1), transform))
        return _Encoded("tabular", None, feature_names, [len(feature_names)], transform, classes,
                        label, report, labels=labels, deferred=parts)
    tables = {}
    for name, part in parts.items():
        columns = tf.apply_tabular(part, transform)
        columns[LABEL_COLUMN] = labels[name]
        tables[name] = pa.table(columns)
    feature_names = [f for f in tables["train"].column_names if f != LABEL_COLUMN]
    return _Encoded("tabular", tables, feature_names, [len(feature_names)], transform, classes,
                    label, report, labels=labels)


def _categorical_columns(frame: pd.DataFrame, features: list[str], declared: list[str] | None) -> list[str]:
    if declared is not None:
        unknown = [c for c in declared if c not in features]
        if unknown:
            raise UserError(f"data.categorical: {unknown[0]!r} is not a feature column")
        return list(declared)
    categorical = []
    for column in features:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            continue
        # A mostly-numeric column with a few stray strings is numeric with bad values (the
        # bad_values policy decides), not a category per distinct number.
        present = values.dropna()
        parsed = pd.to_numeric(present.head(10_000), errors="coerce").notna().mean() if len(present) else 0
        if parsed < 0.5:
            categorical.append(column)
    return categorical


def _na_values_missing(frame: pd.DataFrame, na_values: list[str]) -> pd.DataFrame:
    """`data.na_values` strings are missing in every format (the CSV reader already did it)."""
    if not na_values:
        return frame
    tokens = set(na_values)
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            is_na = frame[column].isin(tokens)
            if is_na.any():
                frame[column] = frame[column].mask(is_na)
    return frame


def _finite_numbers(frame: pd.DataFrame, columns: list[str], config: DataConfig, dropped: Counter, locate,
                    source: str) -> pd.DataFrame:
    """The columns as float64; a string that does not parse or an infinite value fails naming
    the first such cell in source order, or loses its row (`bad_value`)."""
    bad_rows = np.zeros(len(frame), dtype=bool)
    first: tuple[int, str] | None = None
    raw: dict[str, pd.Series] = {}  # the values as read, for the message
    for column in columns:
        values = frame[column]
        numeric = pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
        coerced = (values if numeric else pd.to_numeric(values, errors="coerce")).astype("float64")
        bad = ((coerced.isna() & values.notna()) | np.isinf(coerced)).to_numpy()
        if bad.any():
            raw[column] = values
            bad_rows |= bad
            position = int(np.argmax(bad))
            if first is None or position < first[0]:
                first = (position, column)
        frame[column] = coerced
    if first is None:
        return frame
    if config.bad_values == "fail":
        position, column = first
        value = frame[column].iloc[position]
        uri, at = locate(frame.index[position])
        if np.isnan(value):
            what = (f"{raw[column].iloc[position]!r} is not a number (list the column under "
                    "data.categorical to encode it, add the string to data.na_values if it means "
                    "missing, or set data.bad_values: drop)")
        else:
            what = f"{float(value)} is not a finite number (or set data.bad_values: drop)"
        raise UserError(f"{uri}: {at}, column {column!r}: {what}")
    return _drop(frame, bad_rows, "bad_value", dropped, f"data.bad_values: every row of {source} has a bad value")


def column_list(columns, limit: int = 20) -> str:
    """Column names for a message: the first `limit`, then how many more."""
    names = [str(c) for c in columns]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _policies(config: DataConfig, features: list[str]) -> dict[str, str]:
    unknown = [c for c in config.missing_by_column if c not in features]
    if unknown:
        raise UserError(f"data.missing_by_column.{unknown[0]}: not a feature column")
    return {c: config.missing_by_column.get(c, config.missing) for c in features}


def _drop(frame: pd.DataFrame, mask, reason: str, dropped: Counter, when_empty: str = "") -> pd.DataFrame:
    """Drop the rows under `mask`, counted under `reason`; `when_empty` is the error if none is left."""
    mask = np.asarray(mask, dtype=bool)
    count = int(mask.sum())
    if count:
        dropped[reason] += count
        frame = frame[~mask]
    if frame.empty:
        raise UserError(when_empty or f"data: every row was dropped ({reason})")
    return frame


def _locator(per_file: list[tuple[str, int]], fmt: str):
    """Map a row position of the concatenated table back to (file, "row N (line M)" in it)."""
    ends = np.cumsum([rows for _, rows in per_file])
    # CSV: one header line; JSON lines: one record a line; Parquet has rows but no lines.
    header = {"csv": 1, "jsonl": 0}.get(fmt)

    def locate(position: int) -> tuple[str, str]:
        index = int(np.searchsorted(ends, position, side="right"))
        start = int(ends[index - 1]) if index else 0
        row = int(position) - start + 1
        return per_file[index][0], where(row, None if header is None else row + header)

    return locate


# -------------------------------------------------------------------------------------- text


def _is_text(values: pd.Series) -> bool:
    sample = values.dropna().head(1000).astype("string")
    return len(sample) > 0 and bool((sample.str.contains(" ").mean()) > 0.5)


def _text(frame: pd.DataFrame, config: DataConfig, source: str, dropped: Counter) -> _Encoded:
    column = config.text.column
    if column not in frame.columns:
        raise UserError(f"data.text.column: column {column!r} is not in {source}")
    modeling = config.task == "language_modeling"
    label = None if modeling else config.label
    if not modeling and label is None:
        raise UserError(f"data.label: required for task {config.task} (or use task: language_modeling)")
    if label is not None and label not in frame.columns:
        raise UserError(f"data.label: column {label!r} is not in {source}")
    frame = _drop(frame, frame[column].isna() | (frame[column].astype("string").str.strip() == ""),
                  "missing_text", dropped, f"data.text.column: column {column!r} is empty in every row of {source}")
    if label is not None:
        frame = _drop(frame, frame[label].isna(), "missing_label", dropped,
                      f"data.label: column {label!r} has no value in any row of {source}")
    if config.duplicates == "drop":
        frame = _drop(frame, frame.duplicated(subset=[column] + ([label] if label else [])), "duplicate", dropped)
    if len(frame) < 3:
        raise UserError(f"{source}: only {len(frame)} rows left after cleaning; need at least 3 to split")
    group = config.split.group_by
    positions = split_positions(
        frame[label] if label else pd.Series(np.zeros(len(frame))), frame[group] if group else None,
        config.split, stratify=config.task == "classification" and config.split.stratify,
    )
    parts = {name: frame.iloc[index] for name, index in positions.items()}
    transform = {"text": tf.fit_text(parts["train"][column].tolist(), config.text)}
    classes = _classes(parts, label, config) if label else None
    tables = {}
    for name, part in parts.items():
        ids = tf.apply_text(part[column].tolist(), transform["text"])
        columns = {FEATURES_COLUMN: _list_column(ids, pa.int32())}
        if label:
            columns[LABEL_COLUMN] = _encode_labels(part[label], classes)
        tables[name] = pa.table(columns)
    lengths = parts["train"][column].astype("string").str.split().str.len()
    report = {"columns": {column: {
        "kind": "text", "words_mean": round(float(lengths.mean()), 3), "words_max": int(lengths.max()),
        "truncated_rows": int((lengths > config.text.max_length).sum()),
    }}}
    vocabulary = transform["text"]["vocabulary"]
    return _Encoded("text", tables, [FEATURES_COLUMN], [config.text.max_length], transform, classes,
                    label, _with_balance(report, _table_labels(tables), classes, config),
                    vocab_size=len(vocabulary))


# ------------------------------------------------------------------------------------ images


def _images(paths, class_names, pixels: np.ndarray, config: DataConfig, source: str) -> _Encoded:
    if not paths:
        raise UserError(f"data.source: {source}: no image decoded")
    labels = pd.Series(class_names, name=config.label or "class")
    if len(labels) < 3:
        raise UserError(f"{source}: only {len(labels)} images; need at least 3 to split")
    positions = split_positions(labels, None, config.split,
                                stratify=config.task == "classification" and config.split.stratify)
    transform = {"image": tf.fit_image(pixels[positions["train"]])}
    parts = {name: labels.iloc[index] for name, index in positions.items()}
    classes = _classes({n: p.to_frame() for n, p in parts.items()}, labels.name, config)
    tables = {}
    for name, index in positions.items():
        features = tf.apply_image(pixels[index], transform["image"])
        tables[name] = pa.table({
            FEATURES_COLUMN: _list_column(features, pa.float32()),
            LABEL_COLUMN: _encode_labels(labels.iloc[index], classes),
        })
    return _Encoded("image", tables, [FEATURES_COLUMN], list(pixels.shape[1:]), transform, classes,
                    labels.name, _with_balance({"columns": {}}, _table_labels(tables), classes, config))


# ------------------------------------------------------------------------------------ common


def _classes(parts: dict[str, pd.DataFrame], label: str, config: DataConfig) -> list | None:
    if config.task != "classification":
        return None
    values = parts["train"][label]
    classes = sorted(values.unique().tolist())
    # Integer labels read back from JSON as ints; numpy scalars would not serialise.
    classes = [c.item() if hasattr(c, "item") else c for c in classes]
    if len(classes) < 2:
        # Training would fail much later (and less clearly) on a single-class dataset.
        raise UserError(
            f"data.label: column {label!r} has {len(classes)} class in the training split "
            f"({', '.join(map(repr, classes))}); classification needs at least two (or set data.task: regression)"
        )
    for name in ("validation", "test"):
        unseen = set(parts[name][label].unique().tolist()) - set(classes)
        if unseen:
            raise UserError(
                f"data.label: class {sorted(unseen, key=str)[0]!r} has zero training rows after "
                f"splitting (it appears only in {name}); add rows of it or drop it"
            )
    return classes


def _encode_labels(values: pd.Series, classes: list | None) -> np.ndarray:
    if classes is None:
        return values.to_numpy(dtype=np.float32)
    index = {c: i for i, c in enumerate(classes)}
    return values.map(index).to_numpy(dtype=np.int64)


def _table_labels(tables: dict[str, pa.Table]) -> dict[str, np.ndarray | None]:
    return {name: t[LABEL_COLUMN].to_numpy() if LABEL_COLUMN in t.column_names else None for name, t in tables.items()}


def _labels_of(encoded: _Encoded, split: str) -> np.ndarray | None:
    if encoded.labels is not None:
        return encoded.labels[split]
    return _table_labels({split: encoded.tables[split]})[split]


def _with_balance(report: dict, labels: dict[str, np.ndarray | None], classes: list | None, config: DataConfig) -> dict:
    report["class_balance"], report["warnings"] = {}, []
    for name, values in labels.items():
        balance, warnings = class_balance(_counts(values, classes), config.imbalance_warning_ratio, name)
        report["class_balance"][name] = balance
        report["warnings"] += warnings
    return report


def _list_column(matrix: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A [N, K] matrix as a list<value_type> column, without a per-row Python loop."""
    n, k = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), type=value_type))


def _rows_per_shard(rows: int, nbytes: int, config: DataConfig) -> int:
    if config.target_shard_mb is None or rows == 0:
        return config.rows_per_shard
    row_bytes = max(nbytes / rows, 1)
    return max(1, min(config.rows_per_shard, int(config.target_shard_mb * 2**20 / row_bytes)))


def _write_shards(table: pa.Table, staging: Staging, split: str, rows_per_shard: int) -> list[str]:
    files = []
    for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        name = f"{split}/part-{index:05d}.parquet"
        part = table.slice(start, rows_per_shard)
        if staging.local:
            Path(staging.path(split)).mkdir(parents=True, exist_ok=True)
            pq.write_table(part, staging.path(name))
        else:
            with staging.open(name) as handle:
                pq.write_table(part, handle)
        files.append(name)
    return files


def _counts(labels: np.ndarray | None, classes: list | None) -> dict[str, int] | None:
    if classes is None or labels is None:
        return None
    counts = np.bincount(labels, minlength=len(classes))
    return {str(c): int(n) for c, n in zip(classes, counts, strict=True)}


__all__ = ["prepare", "SPLITS"]
