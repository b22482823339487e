"""The driver of streaming tabular preparation: plan from the first batch, split keys (when the
split is exact or duplicates are dropped), analyse, fit, then transform and write shards.

The driver holds the plan, merged statistics, and (only in the keys pass) 8-16 bytes per row of
hashes; never rows. The per-file work is `file_passes.py`'s, run by a runner: `local_runner` here,
`ray_tasks.ray_runner` on a Ray cluster. Both merge results in file order, so they write the same
shards and manifest.
"""

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stoker.datasets import file_passes, stats
from stoker.datasets import split as sp
from stoker.datasets import transform as tf
from stoker.datasets.bias_report import class_balance
from stoker.datasets.config import DataConfig
from stoker.datasets.io import Rejects, read_file
from stoker.datasets.manifest import LABEL_COLUMN, SPLITS
from stoker.datasets.stats import CategorySummary, NumericSummary
from stoker.datasets.storage import SourceFile, Staging
from stoker.errors import UserError

Runner = Callable[..., Iterator]
"""runner(function, files, plan, *args) -> (result, rejects, read whole?) per file, in file
order, as they come (a caller that folds them holds one at a time)."""


def local_runner(function, files: list[SourceFile], plan: file_passes.Plan, *args) -> Iterator:
    # One file at a time here, so its column statistics may use every core (at most 8: beyond
    # that, reading the batches is the bottleneck).
    plan = replace(plan, threads=min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                     else os.cpu_count() or 1))
    return (file_passes.per_file(function, item, index, plan, *args) for index, item in enumerate(files))


def sample(files: list[SourceFile], fmt: str, config: DataConfig) -> pd.DataFrame:
    """The first batch of the first file (column kinds are decided on it)."""
    plan = file_passes.Plan.reading(fmt, config, files[0].uri)
    rejects = Rejects(quarantine=config.bad_records == "quarantine")
    try:
        for table in file_passes.file_tables(files[0], 0, plan, rejects):
            return table.to_pandas()
    except file_passes.NotStreamable:
        pass
    # No batch (a header-only CSV) or not streamable: the whole-file reader has the columns
    # or the error message.
    return read_file(files[0], fmt, config, rejects).slice(0, file_passes.BATCH_ROWS).to_pandas()


def make_plan(first: pd.DataFrame, files: list[SourceFile], fmt: str, config: DataConfig, source: str) -> file_passes.Plan:
    label = config.label
    if label is None:
        raise UserError(f"data.label: required for task {config.task} (name the target column)")
    columns = list(first.columns)
    if label not in columns:
        raise UserError(f"data.label: column {label!r} is not in {source} (columns: {file_passes.column_list(columns)})")
    group = config.split.group_by
    if group is not None and group not in columns:
        raise UserError(f"data.split.group_by: column {group!r} is not in {source}")
    frame = tf.add_derived(file_passes.na_values_missing(first.copy(), config.na_values), config.derived)
    features = list(config.features) if config.features else [
        c for c in columns if c not in (label, group) and c not in config.derived
    ]
    features += [d for d in config.derived if d not in features]
    missing_cols = [c for c in features if c not in frame.columns]
    if missing_cols:
        raise UserError(f"data.features: column {missing_cols[0]!r} is not in {source}")
    if not features:
        raise UserError(f"data.features: {source} has no feature columns besides the label")
    categorical = _categorical_columns(frame, features, config.categorical)
    unknown = [c for c in config.missing_by_column if c not in features]
    if unknown:
        raise UserError(f"data.missing_by_column.{unknown[0]}: not a feature column")
    policies = {c: config.missing_by_column.get(c, config.missing) for c in features}
    classification = config.task == "classification"
    return file_passes.Plan(
        fmt=fmt, config=config, source=source, columns=columns, first_uri=files[0].uri, label=label,
        group=group, features=features, numeric=[c for c in features if c not in categorical],
        categorical=categorical, policies=policies,
        stratify=classification and config.split.stratify and group is None,
        integer_label=file_passes.whole_numbers(first[label]),
        thresholds=sp.fixed_thresholds(config.split),
        # Read now, not at import: tests shrink them to stream small data.
        batch_rows=file_passes.BATCH_ROWS, exact_quantile_values=stats.EXACT_QUANTILE_VALUES, cut_bins=sp.CUT_BINS,
    )


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


# ----------------------------------------------------------------------- keys and analysis


@dataclass
class Analysed:
    plan: file_passes.Plan
    transform: dict
    features: list[str]
    classes: list | None
    labels: list[Counter]
    report: dict
    dropped: Counter
    rows_read: int
    file_rows: list[list[int]]
    """Kept rows per file and split (train, validation, test), for writers that run per file."""


def analyse(plan: file_passes.Plan, files: list[SourceFile], run: Runner, rejects: Rejects, on_file=None,
            spill: Staging | None = None) -> Analysed:
    """Passes 1 (when needed) and 2. `spill`: scratch space for duplicate removal, which must
    outlive the transform pass."""
    config = plan.config
    plan = replace(plan, spill=spill if config.duplicates == "drop" else None)
    exact = sum(f.size for f in files) <= file_passes.EXACT_SPLIT_MAX_BYTES
    split_method = "hash"
    plan, split_method = _split_and_duplicates(plan, files, run, exact)
    merged = file_passes.empty_analysis(plan)
    plan, file_rows = merge_files(merged, run(file_passes.analyse_file, files, plan), files, plan, rejects, on_file)
    classes = _classes(merged.labels, plan) if config.task == "classification" else None
    transform = fit(merged.numeric, merged.categorical, plan)
    features = list(tf.apply_tabular(pd.DataFrame({c: pd.Series(dtype="float64") for c in plan.numeric} | {
        c: pd.Series(dtype="string") for c in plan.categorical}), transform))
    report = {"columns": distributions(merged.numeric, merged.categorical),
              "split": _realised(merged.labels, classes, split_method)}
    approximate = [s.rank_error for s in merged.numeric.values() if s.approximate]
    if approximate:
        report["quantiles"] = {"method": "kll", "normalized_rank_error": round(max(approximate), 6)}
    return Analysed(plan, transform, features, classes, merged.labels, report, merged.dropped, merged.rows_read,
                    file_rows)



def merge_files(merged, results, files: list[SourceFile], plan: file_passes.Plan, rejects: Rejects, on_file=None):
    """Merge each file's analysis (`results`: (analysis, rejects, read whole) per file, in file
    order) into `merged`; refuse a source that leaves too few rows to split. Returns the plan
    with the files that must be read whole, and the kept rows per file and split."""
    whole, file_rows = set(plan.whole), []
    for index, (item, (result, file_rejects, read_whole)) in enumerate(zip(files, results, strict=True)):
        merged.merge(result)
        file_rows.append([sum(c.values()) for c in result.labels])
        rejects.records.extend(file_rejects.records)
        if read_whole:
            whole.add(index)
        if on_file:
            on_file(item, result.rows_read)
    if merged.rows_read == 0:
        raise UserError(f"data.source: {plan.source}: no rows")
    kept = sum(sum(c.values()) for c in merged.labels)
    if kept == 0:
        raise file_passes.empty_error(merged.dropped, plan)
    if kept < 3:
        raise UserError(f"{plan.source}: only {kept} rows left after cleaning; need at least 3 to split")
    return replace(plan, whole=frozenset(whole)), file_rows

def _split_and_duplicates(plan: file_passes.Plan, files: list[SourceFile], run: Runner, exact: bool):
    """Pass 1: the rows that repeat an earlier one (first occurrence in source order kept;
    hashes spilled by bucket), and the split's cut-offs: exact, from every kept row's hash,
    while there are few enough rows; otherwise from the merged per-class histograms of the
    hashes. Returns the plan and the split method (`exact` or `histogram`)."""
    config = plan.config
    histogram = sp.CutHistogram(plan.cut_bins)
    keys, whole = [], set()
    for index, (result, _, read_whole) in enumerate(run(file_passes.keys_file, files, plan, exact)):
        histogram.merge(result.histogram)
        result.histogram = None
        if exact:
            keys.append(result)
        if read_whole:
            whole.add(index)
    plan = replace(plan, whole=frozenset(whole))
    if plan.spill is not None:
        file_passes.find_duplicates(plan.spill, histogram)
    total = histogram.rows()
    if exact and 3 <= total <= file_passes.EXACT_SPLIT_MAX_ROWS:
        return replace(plan, thresholds=_exact_thresholds(plan, keys)), "exact"
    if total < 3:
        return plan, "histogram"  # too few rows: analysing says so, naming the cleaning step
    return replace(plan, thresholds=sp.histogram_thresholds(histogram, config.split, plan.group)), "histogram"


def _exact_thresholds(plan: file_passes.Plan, keys: list[file_passes.FileKeys]) -> dict:
    config = plan.config
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    kept = []
    for index, k in enumerate(keys):
        mask = cat(k.kept, bool)
        duplicates = file_passes.duplicate_rows(plan, index)
        if duplicates is not None and len(duplicates):
            mask = mask & ~np.isin(cat(k.rows, np.int64), duplicates)
        kept.append(mask)
    u = cat([cat(k.u, np.uint64)[m] for k, m in zip(keys, kept, strict=True)], np.uint64)
    if plan.group is not None:
        return sp.grouped_thresholds(u, config.split, plan.group)
    if plan.stratify:
        classes = cat([cat(k.classes, np.uint64)[m] for k, m in zip(keys, kept, strict=True)], np.uint64)
        names = {}
        for k in keys:
            for code, name in k.names.items():
                names.setdefault(code, name)
        return sp.exact_thresholds(u, classes, names, config.split)
    return sp.exact_thresholds(u, None, {}, config.split)


def _classes(labels: list[Counter], plan: file_passes.Plan) -> list:
    train = labels[0]
    classes = sorted(train)
    if len(classes) < 2:
        # Training would fail much later (and less clearly) on a single-class dataset.
        raise UserError(
            f"data.label: column {plan.label!r} has {len(classes)} class in the training split "
            f"({', '.join(map(repr, classes))}); classification needs at least two (or set data.task: regression)"
        )
    for name, counts in zip(SPLITS[1:], labels[1:], strict=True):
        unseen = set(counts) - set(train)
        if unseen:
            raise UserError(
                f"data.label: class {sorted(unseen, key=str)[0]!r} has zero training rows after "
                f"splitting (it appears only in {name}); add rows of it or drop it"
            )
    return classes


def fit(numeric: dict[str, NumericSummary], categorical: dict[str, CategorySummary], plan: file_passes.Plan) -> dict:
    """The transform, from the merged statistics of the training split."""
    config = plan.config
    numeric_stats = {}
    for column, summary in numeric.items():
        present = summary.count > 0
        policy = plan.policies[column]
        fill = {
            "drop": None,
            "mean": summary.mean if present else None,
            "median": summary.quantiles([0.5])[0] if present else None,
            "mode": summary.mode() if present else 0.0,
            "constant": config.fill_value,
        }[policy]
        if isinstance(fill, str):
            raise UserError(f"data.fill_value: {fill!r} is not a number, but column {column!r} is numeric")
        std = summary.std() if present else 0.0
        numeric_stats[column] = {
            "policy": policy,
            "mean": float(summary.mean) if present else 0.0,
            # A constant column would divide by zero; leaving it unscaled keeps it at 0.
            "std": std if std > 0 else 1.0,
            "min": float(summary.min) if present else None,
            "max": float(summary.max) if present else None,
            "fill": None if fill is None else float(fill),
        }
    categorical_stats = {}
    for column, summary in categorical.items():
        policy = plan.policies[column]
        fill = None
        if policy == "mode" and summary.counts:
            fill = str(summary.mode())
        elif policy == "constant":
            fill = str(config.fill_value)
        categorical_stats[column] = {"policy": policy, "categories": sorted(summary.counts), "fill": fill}
    return {"derived": dict(config.derived), "scale": config.scale, "encoding": config.encoding,
            "numeric": numeric_stats, "categorical": categorical_stats}


def distributions(numeric: dict[str, NumericSummary], categorical: dict[str, CategorySummary]) -> dict:
    """Raw (pre-transform) distribution of each feature column in the training split."""
    out: dict[str, dict] = {}
    for column, summary in numeric.items():
        q = summary.quantiles([0.0, 0.25, 0.5, 0.75, 1.0])
        out[column] = {
            "kind": "numeric", "missing": summary.missing,
            **{k: _num(v) for k, v in zip(("min", "p25", "median", "p75", "max"), q, strict=True)},
            "mean": _num(summary.mean if summary.count else float("nan")), "std": _num(summary.std()),
        }
        if summary.approximate:
            out[column]["quantile_rank_error"] = round(summary.rank_error, 6)
    for column, summary in categorical.items():
        top = sorted(summary.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        out[column] = {"kind": "categorical", "missing": summary.missing, "distinct": len(summary.counts),
                       "top": {str(k): int(v) for k, v in top}}
    return out


def _num(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(value, 6)


def _realised(labels: list[Counter], classes: list | None, method: str) -> dict:
    """How the split came out: the method (`exact`: each class within one row of the
    fractions; `histogram`: cut-offs on the seeded hash from per-class histograms, see
    `split.py`) and the realised fractions, overall and per class (from the rows written)."""
    totals = [sum(c.values()) for c in labels]
    everything = sum(totals)
    out = {"method": method, "fractions": {n: round(t / everything, 6) for n, t in zip(SPLITS, totals, strict=True)}}
    if classes is not None:
        per_class = {}
        for cls in classes:
            n = sum(c.get(cls, 0) for c in labels)
            per_class[str(cls)] = {name: round(c.get(cls, 0) / n, 6) for name, c in zip(SPLITS, labels, strict=True)}
        out["class_fractions"] = per_class
    return out


def with_balance(report: dict, labels: list[Counter], classes: list | None, ratio: float) -> dict:
    report["class_balance"], report["warnings"] = {}, []
    for name, counts in zip(SPLITS, labels, strict=True):
        per_class = {str(c): int(counts.get(c, 0)) for c in classes} if classes is not None else None
        balance, warnings = class_balance(per_class, ratio, name)
        report["class_balance"][name] = balance
        report["warnings"] += warnings
    return report


def class_counts(analysed: Analysed) -> dict[str, dict[str, int] | None]:
    if analysed.classes is None:
        return {name: None for name in SPLITS}
    return {name: {str(c): int(counts.get(c, 0)) for c in analysed.classes}
            for name, counts in zip(SPLITS, analysed.labels, strict=True)}


# --------------------------------------------------------------------------------- writing


class ShardWriter:
    """Encoded rows of one split, written as `rows_per_shard`-row Parquet files as they fill."""

    def __init__(self, staging: Staging, split: str, rows_per_shard: int) -> None:
        self.staging, self.split, self.rows_per_shard = staging, split, rows_per_shard
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[str] = []
        self.rows = self.bytes = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_shard:
            whole = pa.concat_tables(self.pending)
            self._write(whole.slice(0, self.rows_per_shard))
            rest = whole.slice(self.rows_per_shard)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self, schema: pa.Schema) -> dict:
        if self.pending_rows or not self.files:
            self._write(pa.concat_tables(self.pending) if self.pending else schema.empty_table())
        return {"rows": self.rows, "bytes": self.bytes, "files": self.files}

    def _write(self, table: pa.Table) -> None:
        name = shard_name(self.split, len(self.files))
        self.bytes += write_shard(self.staging, name, table)
        self.files.append(name)
        self.rows += table.num_rows


def shard_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


def write_shard(staging: Staging, name: str, table: pa.Table) -> int:
    """Write one shard (one contiguous chunk, so every engine writes the same file); its bytes."""
    table = table.combine_chunks()
    with staging.open(name) as handle:
        pq.write_table(table, handle, use_dictionary=dictionary_columns(table.schema))
    return int(table.nbytes)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding: all but floating-point ones (and lists of them).
    Scaled features are almost all distinct, so pyarrow's default fills a dictionary page per
    column chunk and falls back to plain encoding anyway: it wrote tabular shards 5x slower and
    half as large again as plain encoding (1M rows x 64 features: 4.0 s of a 12 s preparation)."""
    def floating(kind: pa.DataType) -> bool:
        while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            kind = kind.value_type
        return pa.types.is_floating(kind)

    return [f.name for f in schema if not floating(f.type)]


def output_schema(analysed: Analysed) -> pa.Schema:
    label = pa.int64() if analysed.classes is not None else pa.float32()
    return pa.schema([*(pa.field(f, pa.float32()) for f in analysed.features), pa.field(LABEL_COLUMN, label)])


def rows_per_shard(analysed: Analysed, config: DataConfig) -> int:
    if config.target_shard_mb is None:
        return config.rows_per_shard
    row_bytes = 4 * len(analysed.features) + (8 if analysed.classes is not None else 4)
    return max(1, min(config.rows_per_shard, int(config.target_shard_mb * 2**20 / row_bytes)))


def write_local(analysed: Analysed, files: list[SourceFile], staging: Staging, config: DataConfig) -> dict:
    """Pass 3 in this process: each file's encoded batches go to the split writers in order."""
    size = rows_per_shard(analysed, config)
    writers = [ShardWriter(staging, name, size) for name in SPLITS]
    for index, item in enumerate(files):
        for code, table in file_passes.transform_file_tables(item, index, analysed.plan, analysed.transform,
                                                        analysed.classes):
            writers[code].add(table)
    schema = output_schema(analysed)
    return {name: writer.close(schema) for name, writer in zip(SPLITS, writers, strict=True)}
