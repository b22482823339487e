"""Streaming preparation of tabular sources (CSV, JSON lines, Parquet): analyse, then transform.

Each step is a function of one source file, read as Arrow record batches, that returns
something small and mergeable: the split keys of its kept rows (only while the split is exact
or duplicates are dropped), the partial statistics of its training rows (`stats.py`), or its
encoded rows for the shards. The driver merges the results in file order, so it holds
statistics, never rows. `local` runs the per-file functions here, one batch at a time; `ray`
runs the same functions as Ray tasks (`ray_tasks.py`). A file that cannot stream (a CSV with a
ragged row or an invalid JSON line, or whose column types change after its first block) is read
whole instead, in every pass, so every pass sees the same rows.
"""

import functools
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from stoker.datasets import split as sp
from stoker.datasets import transform as tf
from stoker.datasets.config import DataConfig
from stoker.datasets.io import (
    Rejects,
    csv_convert_options,
    file_error,
    open_source,
    read_file,
    where,
)
from stoker.datasets.stats import EXACT_QUANTILE_VALUES, CategorySummary, NumericSummary
from stoker.datasets.storage import SourceFile, Staging
from stoker.errors import UserError

BATCH_ROWS = 65_536
"""Rows per record batch: the unit of every per-batch function."""
CSV_BLOCK_BYTES = 8 << 20
PREBUFFER_MAX_BYTES = 64 << 20
"""Parquet row groups up to this size (uncompressed) are read in one go."""
EXACT_SPLIT_MAX_BYTES = 256 << 20
"""Sources up to this many bytes get exact per-class split sizes (the keys pass keeps every
kept row's hash)."""
EXACT_SPLIT_MAX_ROWS = 4_000_000
"""...and at most this many kept rows (8-16 bytes of hash each); beyond, the cut-offs come from
the keys pass's per-class histogram of hashes (`split.CutHistogram`), and the manifest reports
the realised fractions."""
CLEANING_ORDER = ("bad_value", "missing_text", "missing_label", "duplicate", "missing_value")


class NotStreamable(Exception):
    """This file has to be read whole (ragged rows, or types that change after the first block)."""


@dataclass
class Plan:
    """Everything a per-file function needs: decided on the driver from the first batch."""

    fmt: str
    config: DataConfig
    source: str
    columns: list[str]
    first_uri: str
    label: str
    group: str | None
    features: list[str]
    numeric: list[str]
    categorical: list[str]
    policies: dict[str, str]
    stratify: bool
    integer_label: bool
    thresholds: dict = field(default_factory=dict)
    spill: Staging | None = None
    """Where the duplicate pass keeps row hashes and, per file, the rows that repeat an
    earlier one (`dups/f<file>-b<bucket>.npy`); None when duplicates are kept."""
    whole: frozenset[int] = frozenset()
    """Files read whole instead of streamed."""
    text: str | None = None
    """The text column, for text preparation (`text.py`): rows without text are dropped."""
    batch_rows: int = BATCH_ROWS
    exact_quantile_values: int = EXACT_QUANTILE_VALUES
    cut_bins: int = sp.CUT_BINS
    """Limits travel with the plan, so Ray workers use the driver's."""
    threads: int = 1
    """Threads for one batch's column statistics in the analyse pass: the local engine's cores
    (it reads one file at a time); one where Ray runs a task per file and CPU."""

    @classmethod
    def reading(cls, fmt: str, config: DataConfig, first_uri: str, **options: Any) -> "Plan":
        """A plan for reading files' batches alone: no cleaning, split or statistics."""
        return cls(fmt, config, "", [], first_uri, "", None, [], [], [], {}, False, False, **options)


# -------------------------------------------------------------------------------- batches


def file_tables(item: SourceFile, index: int, plan: Plan, rejects: Rejects,
                columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The file's rows as tables of at most BATCH_ROWS rows, in order. `columns`: only these
    are needed; a streamed Parquet file whose columns are the plan's is read for them alone
    (other tables have every column)."""
    config = plan.config
    streams = {"parquet": _parquet_batches, "csv": _csv_batches, "jsonl": _jsonl_batches}
    if plan.fmt in streams and index not in plan.whole:
        with open_source(item, config) as handle:
            if plan.fmt == "parquet":
                yield from _parquet_batches(handle, item, plan, columns)
            else:
                yield from streams[plan.fmt](handle, item, plan)
        return
    table = read_file(item, plan.fmt, config, rejects)
    for start in range(0, table.num_rows, plan.batch_rows):
        yield table.slice(start, plan.batch_rows)


def _parquet_batches(handle, item: SourceFile, plan: Plan, columns: list[str] | None = None) -> Iterator[pa.Table]:
    try:
        # A large row group (pyarrow writes up to a million rows in one) is read through a
        # buffer, a page at a time, instead of being loaded whole; small ones are fetched in
        # one coalesced read, which is much faster.
        metadata = pq.ParquetFile(handle).metadata
        largest = max((metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)), default=0)
        if largest > PREBUFFER_MAX_BYTES:
            parquet = pq.ParquetFile(handle, metadata=metadata, buffer_size=1 << 20, pre_buffer=False)
        else:
            parquet = pq.ParquetFile(handle, metadata=metadata, pre_buffer=True)
        if columns is not None and set(parquet.schema_arrow.names) != set(plan.columns):
            columns = None  # read every column: cleaning names the one that differs
        for batch in parquet.iter_batches(batch_size=plan.batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise file_error(item.uri, exc) from None


def _csv_batches(handle, item: SourceFile, plan: Plan) -> Iterator[pa.Table]:
    bad: list = []

    def invalid(row) -> str:
        bad.append(row)
        return "skip"

    try:
        reader = pacsv.open_csv(
            handle, read_options=pacsv.ReadOptions(block_size=min(CSV_BLOCK_BYTES, plan.batch_rows * 64)),
            parse_options=pacsv.ParseOptions(invalid_row_handler=invalid),
            convert_options=csv_convert_options(plan.config),
        )
    except (pa.ArrowInvalid, OSError):
        raise NotStreamable from None
    if any(pa.types.is_binary(f.type) for f in reader.schema):
        raise NotStreamable  # not UTF-8: the whole-file reader says where
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid:
            raise NotStreamable from None  # a type that changed after the first block
        if bad:
            raise NotStreamable  # ragged rows: only a whole-file parse numbers their lines
        yield pa.Table.from_batches([batch])


def _jsonl_batches(handle, item: SourceFile, plan: Plan) -> Iterator[pa.Table]:
    try:
        reader = pajson.open_json(handle, read_options=pajson.ReadOptions(
            block_size=min(CSV_BLOCK_BYTES, plan.batch_rows * 64)))
    except (pa.ArrowInvalid, OSError):
        raise NotStreamable from None
    while True:
        try:
            batch = reader.read_next_batch()
            # The JSON reader passes bytes that are not UTF-8 into strings unchecked.
            batch.validate(full=True)
        except StopIteration:
            return
        except pa.ArrowInvalid:
            raise NotStreamable from None  # an invalid line, bad bytes or a changed type
        yield pa.Table.from_batches([batch])


def per_file(function: Callable, item: SourceFile, index: int, plan: Plan, *args):
    """Run `function(item, index, plan, rejects, *args)` streaming the file, or reading it whole
    when it cannot stream; returns (result, rejects, read whole?)."""
    rejects = Rejects(quarantine=plan.config.bad_records == "quarantine")
    try:
        return function(item, index, plan, rejects, *args), rejects, index in plan.whole
    except NotStreamable:
        plan = _with_whole(plan, index)
        rejects = Rejects(quarantine=rejects.quarantine)
        return function(item, index, plan, rejects, *args), rejects, True


def _with_whole(plan: Plan, index: int) -> Plan:
    from dataclasses import replace

    return replace(plan, whole=plan.whole | {index})


# ------------------------------------------------------------------------------- cleaning


def clean(table: pa.Table, offset: int, item: SourceFile, index: int, plan: Plan, dropped: Counter,
          keys_only: bool = False, duplicates: np.ndarray | None = None) -> pd.DataFrame:
    """One batch, cleaned: na_values, derived features, numbers checked (bad values), missing
    labels, then (unless `keys_only`) `duplicates` (row numbers) and rows missing a value under
    `drop`. The index is the row number in the file (0-based). A batch of only `key_columns`
    (pass 1) skips what cannot drop a row under its plan (derived features and numbers: bad
    values fail, in pass 2, which reads every column)."""
    config = plan.config
    projected = keys_only and set(table.column_names) != set(plan.columns) and \
        set(table.column_names) == set(key_columns(plan) or ())
    if projected:
        frame = table.to_pandas()
        frame.index = pd.RangeIndex(offset, offset + len(frame))
        frame = na_values_missing(frame, config.na_values)
        return _drop_unlabelled(frame, plan, dropped)
    if set(table.column_names) != set(plan.columns):
        extra = sorted(set(table.column_names) ^ set(plan.columns))
        raise UserError(f"{item.uri}: files have different schemas: column {extra[0]!r} is in only one of "
                        f"{item.uri} and {plan.first_uri}")
    frame = table.to_pandas()
    frame.index = pd.RangeIndex(offset, offset + len(frame))
    frame = na_values_missing(frame, config.na_values)
    frame = tf.add_derived(frame, config.derived)
    checked = list(plan.numeric)
    if config.task == "regression" and plan.label is not None:
        values = frame[plan.label]
        if not pd.api.types.is_numeric_dtype(values) and values.notna().any():
            raise UserError(f"data.label: column {plan.label!r} is not numeric, so task cannot be regression")
        checked.append(plan.label)
    header = {"csv": 1, "jsonl": 0}.get(plan.fmt)

    def locate(row: int) -> tuple[str, str]:
        return item.uri, where(row + 1, None if header is None else row + 1 + header)

    frame = finite_numbers(frame, checked, config, dropped, locate)
    frame = _drop_unlabelled(frame, plan, dropped)
    if keys_only:
        return frame
    if duplicates is not None and len(duplicates):
        frame = _drop(frame, np.isin(frame.index.to_numpy(), duplicates), "duplicate", dropped)
    return _drop(frame, _missing_mask(frame, plan), "missing_value", dropped)


def whole_numbers(column: pd.Series) -> bool:
    """A label column of whole numbers: integers, or floats only because a value is missing (a
    CSV batch with an empty label reads its integer column as float)."""
    if pd.api.types.is_integer_dtype(column):
        return True
    if not pd.api.types.is_float_dtype(column) or not column.isna().any():
        return False
    known = column.dropna()
    return bool(len(known)) and bool((known == known.round()).all())


def _drop_unlabelled(frame: pd.DataFrame, plan: Plan, dropped: Counter) -> pd.DataFrame:
    """Rows without text (text plans) or without a label are dropped."""
    if plan.text is not None:
        text = frame[plan.text]
        blank = (text.isna() | (text.astype("string").str.strip() == "")).to_numpy(dtype=bool)
        frame = _drop(frame, blank, "missing_text", dropped)
    if plan.label is not None:
        frame = _drop(frame, frame[plan.label].isna().to_numpy(), "missing_label", dropped)
    if plan.integer_label and plan.config.task == "classification":
        # A batch with a missing label read the integer column as float; the classes stay ints.
        frame[plan.label] = frame[plan.label].astype("int64")
    return frame


def key_columns(plan: Plan) -> list[str] | None:
    """The columns pass 1 reads when it only needs the split keys and which rows are kept (not
    duplicates, which hash every column): the label, group and text columns and those whose
    missing values drop the row. None (every column) when bad values drop rows rather than
    fail (every number is checked) or a derived feature can drop one (it needs its inputs)."""
    config = plan.config
    if plan.spill is not None or config.bad_values == "drop":
        return None
    dropping = [c for c in plan.features if plan.policies[c] == "drop"]
    if any(c in config.derived for c in dropping):
        return None
    wanted = {plan.label, plan.group, plan.text, *dropping}
    return [c for c in plan.columns if c in wanted]


def _missing_mask(frame: pd.DataFrame, plan: Plan) -> np.ndarray:
    columns = [c for c in plan.features if plan.policies[c] == "drop"]
    if not columns:
        return np.zeros(len(frame), dtype=bool)
    return frame[columns].isna().any(axis=1).to_numpy()


def _drop(frame: pd.DataFrame, mask: np.ndarray, reason: str, dropped: Counter) -> pd.DataFrame:
    count = int(mask.sum())
    if count:
        dropped[reason] += count
        frame = frame[~mask]
    return frame


def na_values_missing(frame: pd.DataFrame, na_values: list[str]) -> pd.DataFrame:
    """`data.na_values` strings are missing in every format (the CSV reader already did it)."""
    if not na_values:
        return frame
    tokens = set(na_values)
    for column, dtype in frame.dtypes.to_dict().items():
        if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
            is_na = frame[column].isin(tokens)
            if is_na.any():
                frame[column] = frame[column].mask(is_na)
    return frame


def finite_numbers(frame: pd.DataFrame, columns: list[str], config: DataConfig, dropped: Counter,
                   locate) -> pd.DataFrame:
    """The columns as float64; a string that does not parse or an infinite value fails naming
    the first such cell in source order, or loses its row (`bad_value`)."""
    bad_rows = np.zeros(len(frame), dtype=bool)
    first: tuple[int, str] | None = None
    raw: dict[str, pd.Series] = {}  # the values as read, for the message
    dtypes = frame.dtypes.to_dict()  # one lookup per column: frame[c] is slow with many columns
    numbers = [c for c in columns if pd.api.types.is_numeric_dtype(dtypes[c]) or pd.api.types.is_bool_dtype(dtypes[c])]
    if numbers:
        # Already numbers (the common case): one block, one isinf; every column becomes
        # float64, so equal values hash equally whatever type a batch was read as.
        to_float = {c: "float64" for c in numbers if dtypes[c] != np.float64}
        if to_float:
            frame = frame.astype(to_float)
        infinite = np.isinf(frame[numbers].to_numpy(dtype=np.float64, na_value=np.nan))
        if infinite.any():
            for i, column in enumerate(numbers):
                bad = infinite[:, i]
                if bad.any():
                    bad_rows |= bad
                    position = int(np.argmax(bad))
                    if first is None or position < first[0]:
                        first = (position, column)
    for column in columns:
        if column in numbers:
            continue
        values = frame[column]
        coerced = pd.to_numeric(values, errors="coerce").astype("float64")
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
    return _drop(frame, bad_rows, "bad_value", dropped)


def column_list(columns, limit: int = 20) -> str:
    """Column names for a message: the first `limit`, then how many more."""
    names = [str(c) for c in columns]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def empty_error(dropped: Counter, plan: Plan) -> UserError:
    """Why no row is left: the last cleaning step that dropped rows emptied the data."""
    reason = [r for r in CLEANING_ORDER if dropped.get(r)][-1]
    source, label = plan.source, plan.label
    return UserError({
        "bad_value": f"data.bad_values: every row of {source} has a bad value",
        "missing_text": f"data.text.column: column {plan.text!r} is empty in every row of {source}",
        "missing_label": f"data.label: column {label!r} has no value in any row of {source}",
        "duplicate": f"data.duplicates: every row of {source} is a duplicate",
        "missing_value": (
            "data.missing: every row was dropped (missing_value): each misses a value in one of "
            f"{column_list([c for c in plan.features if plan.policies[c] == 'drop'])}; impute instead "
            "of dropping (data.missing: mean, median, mode or constant)"),
    }[reason])


# ----------------------------------------------------------------------------- split keys


def _keys(frame: pd.DataFrame, item: SourceFile, plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
    """(u, class id) of each row: u from the group's value or from (file, row number)."""
    seed = plan.config.split.seed
    if plan.group is not None:
        u = sp.value_hashes(seed, frame[plan.group])
    else:
        u = sp.row_hashes(seed, item.relative, frame.index.to_numpy())
    classes = sp.value_hashes(0, frame[plan.label]) if plan.stratify else None
    return u, classes


def split_codes(frame: pd.DataFrame, item: SourceFile, plan: Plan) -> np.ndarray:
    u, classes = _keys(frame, item, plan)
    return sp.assign(u, classes, plan.thresholds)


@dataclass
class FileKeys:
    histogram: sp.CutHistogram
    """Kept rows (those that survive the missing-value policy; duplicates are uncounted by
    `find_duplicates`) per class and bin of u, for large datasets' cut-offs."""
    rows: list[np.ndarray] = field(default_factory=list)
    kept: list[np.ndarray] = field(default_factory=list)
    u: list[np.ndarray] = field(default_factory=list)
    classes: list[np.ndarray] = field(default_factory=list)
    names: dict = field(default_factory=dict)


_ROW_MASK = (1 << 63) - 1
HASH_BUCKETS = 64
"""Row hashes are spilled in this many buckets by their top bits; the driver deduplicates one
bucket at a time, so it holds 1/64th of the hashes at once."""
SPILL_ENTRIES = 1 << 20
"""Hashes a per-file task buffers before it writes them out."""


def keys_file(item: SourceFile, index: int, plan: Plan, rejects: Rejects, want_keys: bool) -> FileKeys:
    """Pass 1, per row that survives bad values and missing labels: its content hash with its
    number, u and class, spilled by bucket (when duplicates are dropped); the histogram of u per
    class of the rows that also survive the missing-value policy; and (`want_keys`, for an exact
    split) each row's number, whether it survives the missing-value policy, its u and class."""
    out = FileKeys(sp.CutHistogram(plan.cut_bins))
    offset = 0
    dropped: Counter = Counter()
    pending: list[np.ndarray] = []
    chunks = 0
    for table in file_tables(item, index, plan, rejects, key_columns(plan)):
        frame = clean(table, offset, item, index, plan, dropped, keys_only=True)
        offset += table.num_rows
        u, classes = _keys(frame, item, plan)
        kept = ~_missing_mask(frame, plan)
        out.histogram.add(u[kept], classes[kept] if classes is not None else None)
        if plan.spill is not None:
            content = [*plan.features, *([plan.label] if plan.label is not None else [])]
            hashes = pd.util.hash_pandas_object(frame[content], index=False).to_numpy()
            # The row number carries "counted in the histogram" in its top bit, so a duplicate
            # found later can be uncounted (`find_duplicates`).
            rows = frame.index.to_numpy(np.uint64) | (kept.astype(np.uint64) << np.uint64(63))
            pending.append(np.column_stack([hashes, rows, u, *([classes] if classes is not None else [])]))
            if sum(len(p) for p in pending) >= SPILL_ENTRIES:
                _spill_hashes(plan.spill, index, chunks, pending)
                pending, chunks = [], chunks + 1
        if want_keys:
            out.rows.append(frame.index.to_numpy(np.int64))
            out.kept.append(kept)
            out.u.append(u)
            if classes is not None:
                out.classes.append(classes)
                for code, value in zip(*np.unique(classes, return_index=True), strict=True):
                    out.names.setdefault(int(code), _python(frame[plan.label].iloc[int(value)]))
    if plan.spill is not None and pending:
        _spill_hashes(plan.spill, index, chunks, pending)
    return out


def _spill_hashes(spill: Staging, index: int, chunk: int, pending: list[np.ndarray]) -> None:
    entries = np.concatenate(pending)
    bucket = (entries[:, 0] >> np.uint64(58)).astype(np.int64)  # top 6 bits: HASH_BUCKETS
    for b in np.unique(bucket):
        with spill.open(f"hashes/b{b:02d}/f{index:05d}-{chunk:05d}.npy") as handle:
            np.save(handle, entries[bucket == b])


def duplicate_rows(plan: Plan, index: int) -> np.ndarray | None:
    """Sorted row numbers of file `index` that repeat an earlier row (after pass 1)."""
    if plan.spill is None:
        return None
    names = sorted(plan.spill.fs.glob(plan.spill.path(f"dups/f{index:05d}-b*.npy")))
    parts = []
    for name in names:
        with plan.spill.fs.open(name, "rb") as handle:
            parts.append(np.load(handle))
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def find_duplicates(spill: Staging, histogram: sp.CutHistogram | None = None) -> int:
    """The driver's part of deduplication, bucket by bucket: in each bucket, a row whose hash
    appeared earlier in source order (file, then row) is a duplicate; its number is written
    under `dups/`, and it is uncounted from `histogram` if pass 1 counted it. Returns how many
    rows are duplicates."""
    total = 0
    for b in range(HASH_BUCKETS):
        names = sorted(spill.fs.glob(spill.path(f"hashes/b{b:02d}/*.npy")))
        if not names:
            continue
        parts, files = [], []
        for name in names:  # file-index then chunk order: source order
            with spill.fs.open(name, "rb") as handle:
                part = np.load(handle)
            parts.append(part)
            files.append(np.full(len(part), int(name.rsplit("/", 1)[1][1:6]), dtype=np.int64))
        entries, owner = np.concatenate(parts), np.concatenate(files)
        order = np.argsort(entries[:, 0], kind="stable")
        repeat = np.zeros(len(entries), dtype=bool)
        repeat[order[1:][entries[order[1:], 0] == entries[order[:-1], 0]]] = True
        total += int(repeat.sum())
        counted = (entries[:, 1] >> np.uint64(63)).astype(bool)
        if histogram is not None:
            uncount = repeat & counted
            histogram.add(entries[uncount, 2], entries[uncount, 3] if entries.shape[1] > 3 else None, sign=-1)
        rows = entries[:, 1] & np.uint64(_ROW_MASK)
        for index in np.unique(owner[repeat]):
            with spill.open(f"dups/f{index:05d}-b{b:02d}.npy") as handle:
                np.save(handle, rows[repeat & (owner == index)])
    return total


# -------------------------------------------------------------------------------- analyse


@dataclass
class FileAnalysis:
    numeric: dict[str, NumericSummary]
    categorical: dict[str, CategorySummary]
    labels: list[Counter]
    """Label counts per split (train, validation, test); regression: row counts under None."""
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)

    def merge(self, other: "FileAnalysis") -> None:
        for name, summary in other.numeric.items():
            self.numeric[name].merge(summary)
        for name, summary in other.categorical.items():
            self.categorical[name].merge(summary)
        for mine, theirs in zip(self.labels, other.labels, strict=True):
            mine.update(theirs)
        self.rows_read += other.rows_read
        self.dropped.update(other.dropped)


def empty_analysis(plan: Plan) -> FileAnalysis:
    return FileAnalysis(
        numeric={c: NumericSummary(modes=Counter() if plan.policies[c] == "mode" else None,
                                   exact_limit=plan.exact_quantile_values) for c in plan.numeric},
        categorical={c: CategorySummary() for c in plan.categorical},
        labels=[Counter(), Counter(), Counter()],
    )


def analyse_file(item: SourceFile, index: int, plan: Plan, rejects: Rejects) -> FileAnalysis:
    """Pass 2: cleaning counts, rows per split and class, and partial statistics of the
    training rows, batch by batch."""
    out = empty_analysis(plan)
    offset = 0
    duplicates = duplicate_rows(plan, index)
    with _statistics_pool(plan) as pool:
        for table in file_tables(item, index, plan, rejects):
            _analyse_batch(table, offset, item, index, plan, out, duplicates, pool)
            offset += table.num_rows
    return out


def _statistics_pool(plan: Plan):
    """Threads for the columns' statistics (numpy's sorts and reductions let go of the GIL), or
    none where the engine already runs a file per CPU."""
    return ThreadPoolExecutor(plan.threads) if plan.threads > 1 else nullcontext()


def _summarise(out: FileAnalysis, plan: Plan, column: str, values: np.ndarray) -> None:
    batch = NumericSummary.of(values, want_mode=plan.policies[column] == "mode", exact_limit=plan.exact_quantile_values)
    out.numeric[column].merge(batch)


def _analyse_batch(table: pa.Table, offset: int, item: SourceFile, index: int, plan: Plan, out: FileAnalysis,
                   duplicates: np.ndarray | None, pool: ThreadPoolExecutor | None) -> None:
    """One batch of pass 2 into `out`."""
    out.rows_read += table.num_rows
    frame = clean(table, offset, item, index, plan, out.dropped, duplicates=duplicates)
    if frame.empty:
        return
    codes = split_codes(frame, item, plan)
    labels = frame[plan.label] if plan.config.task == "classification" else None
    for code in range(3):
        chosen = codes == code
        if labels is not None:
            out.labels[code].update(dict(zip(*_value_counts(labels[chosen]), strict=True)))
        else:
            out.labels[code][None] += int(chosen.sum())
    train = codes == 0
    if plan.numeric:
        # One copy of the training rows' numbers, a row per column (not a pandas take of
        # every column first); each column's summary is independent of the others'.
        block = frame[plan.numeric].to_numpy(np.float64, na_value=np.nan).T[:, train]
        summarise = functools.partial(_summarise, out, plan)
        list(pool.map(summarise, plan.numeric, block) if pool else map(summarise, plan.numeric, block))
    for column in plan.categorical:
        values = frame.loc[train, column].astype("string")
        batch = CategorySummary(Counter(dict(zip(*_value_counts(values.dropna()), strict=True))),
                                int(values.isna().sum()))
        out.categorical[column].merge(batch)


def _value_counts(values: pd.Series) -> tuple[list, list]:
    counts = values.value_counts(sort=False)
    return [_python(v) for v in counts.index], counts.to_numpy().tolist()


def _python(value):
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------ transform


def transform_file(item: SourceFile, index: int, plan: Plan, rejects: Rejects, transform: dict,
                   classes: list | None) -> Iterator[tuple[int, pa.Table]]:
    """Pass 3: every batch cleaned again (the same rows as pass 2), split and encoded with the
    fitted transform: (split code, encoded rows), in source order."""
    offset = 0
    index_of = pd.Index(classes) if classes is not None else None
    duplicates = duplicate_rows(plan, index)
    for table in file_tables(item, index, plan, rejects):
        frame = clean(table, offset, item, index, plan, Counter(), duplicates=duplicates)
        offset += table.num_rows
        if frame.empty:
            continue
        codes = split_codes(frame, item, plan)
        # The batch is encoded once, then each split's rows are taken from the encoded table
        # (float32, and Arrow's filter instead of a pandas take of every raw column per split).
        columns = tf.apply_tabular(frame, transform)
        labels = frame[plan.label]
        if index_of is None:
            columns["label"] = labels.to_numpy(dtype=np.float32)
        else:
            columns["label"] = index_of.get_indexer(labels.to_numpy()).astype(np.int64)
        encoded = pa.table(columns)
        for code in range(3):
            chosen = codes == code
            if chosen.any():
                yield code, encoded.filter(chosen)


def transform_file_tables(item: SourceFile, index: int, plan: Plan, transform: dict,
                          classes: list | None) -> Iterator[tuple[int, pa.Table]]:
    """`transform_file` for the driver's writer: the file's whole-read flag comes from pass 2."""
    rejects = Rejects(quarantine=True)  # pass 2 has reported (or set aside) bad records already
    yield from transform_file(item, index, plan, rejects, transform, classes)
