"""Text preparation (a text column, or text files of one row per line), streamed like tabular
data: the same batches, cleaning, split keys and duplicate spill (`file_passes.py`, `tabular.py`);
the analyse pass merges training token counts (the vocabulary is cut from them with the
configured cap) and word-count statistics; the transform pass tokenises batch by batch and
writes shards as they fill. Runs in this process (either engine).
"""

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import pyarrow as pa

from stoker.datasets import file_passes, stats, tabular
from stoker.datasets import split as sp
from stoker.datasets import transform as tf
from stoker.datasets.config import DataConfig
from stoker.datasets.io import Rejects
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, SPLITS
from stoker.datasets.storage import SourceFile, Staging
from stoker.errors import UserError


def make_plan(first: pd.DataFrame, files: list[SourceFile], fmt: str, config: DataConfig, source: str) -> file_passes.Plan:
    column = config.text.column
    if column not in first.columns:
        raise UserError(f"data.text.column: column {column!r} is not in {source}")
    modeling = config.task == "language_modeling"
    label = None if modeling else config.label
    if not modeling and label is None:
        raise UserError(f"data.label: required for task {config.task} (or use task: language_modeling)")
    if label is not None and label not in first.columns:
        raise UserError(f"data.label: column {label!r} is not in {source}")
    group = config.split.group_by
    if group is not None and group not in first.columns:
        raise UserError(f"data.split.group_by: column {group!r} is not in {source}")
    classification = config.task == "classification"
    return file_passes.Plan(
        fmt=fmt, config=config, source=source, columns=list(first.columns), first_uri=files[0].uri, label=label,
        group=group, features=[column], numeric=[], categorical=[], policies={column: "keep"},
        stratify=classification and config.split.stratify and group is None and label is not None,
        integer_label=label is not None and file_passes.whole_numbers(first[label]),
        thresholds=sp.fixed_thresholds(config.split), text=column,
        batch_rows=file_passes.BATCH_ROWS, exact_quantile_values=stats.EXACT_QUANTILE_VALUES, cut_bins=sp.CUT_BINS,
    )


@dataclass
class TextAnalysis:
    tokens: Counter = field(default_factory=Counter)
    labels: list[Counter] = field(default_factory=lambda: [Counter(), Counter(), Counter()])
    words: int = 0
    words_max: int = 0
    truncated: int = 0
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)

    def merge(self, other: "TextAnalysis") -> None:
        self.tokens.update(other.tokens)
        for mine, theirs in zip(self.labels, other.labels, strict=True):
            mine.update(theirs)
        self.words += other.words
        self.words_max = max(self.words_max, other.words_max)
        self.truncated += other.truncated
        self.rows_read += other.rows_read
        self.dropped.update(other.dropped)


def analyse_file(item: SourceFile, index: int, plan: file_passes.Plan, rejects: Rejects, options: dict) -> TextAnalysis:
    """Pass 2 for text: label counts per split, and the training rows' token counts and lengths."""
    out = TextAnalysis()
    offset = 0
    duplicates = file_passes.duplicate_rows(plan, index)
    for table in file_passes.file_tables(item, index, plan, rejects):
        out.rows_read += table.num_rows
        frame = file_passes.clean(table, offset, item, index, plan, out.dropped, duplicates=duplicates)
        offset += table.num_rows
        if frame.empty:
            continue
        codes = file_passes.split_codes(frame, item, plan)
        for code in range(3):
            chosen = codes == code
            if plan.label is not None and plan.config.task == "classification":
                values = frame[plan.label][chosen].tolist()
                out.labels[code].update(values)
            else:
                out.labels[code][None] += int(chosen.sum())
        train = frame[plan.text][codes == 0]
        for tokens in tf.clean_tokens(train.tolist(), options):
            out.tokens.update(tokens)
        lengths = train.astype("string").str.split().str.len().to_numpy(dtype=np.int64)
        if len(lengths):
            out.words += int(lengths.sum())
            out.words_max = max(out.words_max, int(lengths.max()))
            out.truncated += int((lengths > plan.config.text.max_length).sum())
    return out


def analyse(plan: file_passes.Plan, files: list[SourceFile], rejects: Rejects, on_file=None,
            spill: Staging | None = None) -> tabular.Analysed:
    config = plan.config
    plan = replace(plan, spill=spill if config.duplicates == "drop" else None)
    exact = sum(f.size for f in files) <= file_passes.EXACT_SPLIT_MAX_BYTES
    plan, split_method = tabular._split_and_duplicates(plan, files, tabular.local_runner, exact)
    options = tf.text_options(config.text)
    merged = TextAnalysis()
    results = (file_passes.per_file(analyse_file, item, index, plan, options) for index, item in enumerate(files))
    plan, file_rows = tabular.merge_files(merged, results, files, plan, rejects, on_file)
    classes = tabular._classes(merged.labels, plan) if plan.label is not None and config.task == "classification" else None
    transform = {"text": tf.vocabulary_from(merged.tokens, options, config.text)}
    train_rows = sum(merged.labels[0].values())
    report = {"columns": {plan.text: {
        "kind": "text", "words_mean": round(merged.words / max(train_rows, 1), 3), "words_max": merged.words_max,
        "truncated_rows": merged.truncated,
    }}, "split": tabular._realised(merged.labels, classes, split_method)}
    return tabular.Analysed(plan, transform, [FEATURES_COLUMN], classes, merged.labels, report, merged.dropped,
                            merged.rows_read, file_rows)


def transform_file(item: SourceFile, index: int, plan: file_passes.Plan, transform: dict,
                   classes: list | None) -> Iterator[tuple[int, pa.Table]]:
    """Pass 3 for text: token ids per batch, split by split code."""
    rejects = Rejects(quarantine=True)  # pass 2 has reported (or set aside) bad records already
    index_of = pd.Index(classes) if classes is not None else None
    duplicates = file_passes.duplicate_rows(plan, index)
    offset = 0
    for table in file_passes.file_tables(item, index, plan, rejects):
        frame = file_passes.clean(table, offset, item, index, plan, Counter(), duplicates=duplicates)
        offset += table.num_rows
        if frame.empty:
            continue
        codes = file_passes.split_codes(frame, item, plan)
        for code in range(3):
            part = frame[codes == code]
            if part.empty:
                continue
            columns = {FEATURES_COLUMN: tf.list_column(tf.apply_text(part[plan.text].tolist(), transform["text"]),
                                                       pa.int32())}
            if plan.label is not None:
                labels = part[plan.label]
                columns[LABEL_COLUMN] = (index_of.get_indexer(labels.to_numpy()).astype(np.int64)
                                         if index_of is not None else labels.to_numpy(dtype=np.float32))
            yield code, pa.table(columns)


def write(analysed: tabular.Analysed, files: list[SourceFile], staging: Staging, config: DataConfig) -> dict:
    length = config.text.max_length
    row_bytes = 4 * length + 4 + (8 if analysed.plan.label is not None else 0)
    size = config.rows_per_shard if config.target_shard_mb is None else max(
        1, min(config.rows_per_shard, int(config.target_shard_mb * 2**20 / row_bytes)))
    writers = [tabular.ShardWriter(staging, name, size) for name in SPLITS]
    for index, item in enumerate(files):
        for code, table in transform_file(item, index, analysed.plan, analysed.transform, analysed.classes):
            writers[code].add(table)
    fields = [pa.field(FEATURES_COLUMN, pa.list_(pa.int32()))]
    if analysed.plan.label is not None:
        fields.append(pa.field(LABEL_COLUMN, pa.int64() if analysed.classes is not None else pa.float32()))
    schema = pa.schema(fields)
    return {name: writer.close(schema) for name, writer in zip(SPLITS, writers, strict=True)}
