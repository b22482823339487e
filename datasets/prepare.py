"""Raw files -> cleaned, encoded, split Parquet shards plus manifest.json.

Every statistic (imputation values, scaling, categories, vocabulary, image channel means) is fit
on the training split only and saved in the manifest, so validation and test rows never leak
into training and the same transform can be applied to new data later (`apply.py`).

Tabular sources (CSV, JSON lines, Parquet) stream (`tabular.py`, `stream.py`): an analyse pass
computes mergeable statistics batch by batch, then a transform pass encodes each batch and
writes shards as they fill, so memory stays bounded whatever the number of rows. `data.engine`
picks where the per-file work runs: in this process (`local`) or as Ray tasks (`ray`,
`engine.py`); the same functions run either way, so both write identical shards and manifests.
Image folders are prepared in chunks of images in this process (`images.py`); text sources are
still prepared in memory.
"""

import json
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stoker import __version__
from stoker.datasets import images, tabular
from stoker.datasets import transform as tf
from stoker.datasets.config import DataConfig
from stoker.datasets.io import Rejects, detect_format, read_tables
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, MANIFEST, SPLITS, Manifest
from stoker.datasets.progress import Progress
from stoker.datasets.report import class_balance
from stoker.datasets.split import split_positions
from stoker.datasets.storage import Staging, atomic_output, fingerprint, list_sources, scratch
from stoker.errors import UserError


@dataclass
class _Encoded:
    """A prepared text or image dataset before it is written (tabular ones stream instead)."""

    modality: str
    tables: dict[str, pa.Table] | None
    features: list[str]
    input_shape: list[int]
    transform: dict
    classes: list | None
    label: str | None
    report: dict
    vocab_size: int | None = None


def prepare(config: DataConfig, progress: Callable[[str], None] | None = None) -> Manifest:
    """Prepare the dataset described by `config` and return its manifest.

    `progress` receives a line now and then on long preparations (files, rows, throughput).
    """
    with ExitStack() as scratch_areas:
        return _prepare(config, progress, scratch_areas)


def _prepare(config: DataConfig, progress: Callable[[str], None] | None, scratch_areas: ExitStack) -> Manifest:
    files = list_sources(config.sources, config.s3)
    fmt = detect_format(files, config.format)
    tracker = Progress(progress, total_files=len(files))
    rejects = Rejects(quarantine=config.bad_records == "quarantine")
    dropped: Counter[str] = Counter()
    source = config.sources[0] if len(config.sources) == 1 else ", ".join(config.sources)

    analysed = image_plan = None
    if fmt == "images":
        image_plan = images.analyse(files, config, source, tracker.file_read)
        encoded = _Encoded("image", None, [FEATURES_COLUMN], image_plan.input_shape, image_plan.transform,
                           image_plan.classes, image_plan.label, {"columns": {}})
    else:
        first = tabular.sample(files, fmt, config)
        text_input = fmt == "text" or config.task == "language_modeling" or (
            config.text.column in first.columns and config.features is None
            and _is_text(first[config.text.column])
        )
        if text_input:
            frame = read_tables(files, fmt, config, rejects, tracker.file_read).to_pandas()
            tracker.stage("read")
            if frame.empty:
                raise UserError(f"data.source: {source}: no rows")
            encoded = _text(frame, config, source, dropped)
        else:
            plan = tabular.make_plan(first, files, fmt, config, source)
            del first
            # Duplicate removal spills row hashes next to the output (shared with Ray tasks).
            spill = scratch_areas.enter_context(scratch(config.output, config.s3)) if config.duplicates == "drop" else None
            analysed = tabular.analyse(plan, files, _runner(config), rejects, tracker.file_read, spill)
            dropped.update(analysed.dropped)
            report = tabular.with_balance(analysed.report, analysed.labels, analysed.classes,
                                          config.imbalance_warning_ratio)
            encoded = _Encoded("tabular", None, analysed.features, [len(analysed.features)], analysed.transform,
                               analysed.classes, plan.label, report)
    tracker.stage("transform" if analysed is None and image_plan is None else "analyse")

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
        if analysed is not None:
            # Pass 3: encode and write as the rows stream by.
            if config.engine == "ray":
                from stoker.datasets import engine

                manifest.splits = engine.write_ray(analysed, files, staging, config)
            else:
                manifest.splits = tabular.write_local(analysed, files, staging, config)
            for name, counts in tabular.class_counts(analysed).items():
                manifest.splits[name]["class_counts"] = counts
        elif image_plan is not None:
            manifest.splits, counts = images.write(image_plan, staging, config, rejects)
            classes = image_plan.classes
            report = tabular.with_balance(manifest.report, counts, classes, config.imbalance_warning_ratio)
            manifest.warnings, manifest.rejected = report.pop("warnings"), rejects.counts()
            for name, per_class in zip(SPLITS, counts, strict=True):
                manifest.splits[name]["class_counts"] = (
                    {str(c): int(per_class.get(c, 0)) for c in classes} if classes is not None else None)
        else:
            for name in SPLITS:
                table = encoded.tables[name]
                manifest.splits[name] = {
                    "rows": table.num_rows,
                    "bytes": int(table.nbytes),
                    "files": _write_shards(table, staging, name, _rows_per_shard(table.num_rows, table.nbytes, config)),
                    "class_counts": _counts(_table_labels({name: table})[name], encoded.classes),
                }
        if rejects.records:
            with staging.open("rejected/rejected.jsonl") as handle:
                handle.write("".join(json.dumps(r) + "\n" for r in rejects.records).encode())
        with staging.open(MANIFEST) as handle:
            handle.write(manifest.to_json().encode())
    tracker.stage("write")
    rows = sum(info["rows"] for info in manifest.splits.values())
    manifest.report["timing"] = {
        "seconds": round(tracker.elapsed(), 3),
        "rows_per_s": round(rows / max(tracker.elapsed(), 1e-9), 1),
        "stages": {k: round(v, 3) for k, v in tracker.stages.items()},
    }
    return manifest


def _runner(config: DataConfig) -> tabular.Runner:
    if config.engine == "ray":
        from stoker.datasets import engine

        return engine.ray_runner
    return tabular.local_runner


# -------------------------------------------------------------------------------------- text


def _drop(frame: pd.DataFrame, mask, reason: str, dropped: Counter, when_empty: str) -> pd.DataFrame:
    """Drop the rows under `mask`, counted under `reason`; `when_empty` is the error if none is left."""
    mask = np.asarray(mask, dtype=bool)
    count = int(mask.sum())
    if count:
        dropped[reason] += count
        frame = frame[~mask]
    if frame.empty:
        raise UserError(when_empty)
    return frame


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
        frame = _drop(frame, frame.duplicated(subset=[column] + ([label] if label else [])), "duplicate", dropped, "")
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
