"""Raw files -> cleaned, encoded, split Parquet shards plus manifest.json.

Every statistic (imputation values, scaling, categories, vocabulary, image channel means) is fit
on the training split only and saved in the manifest, so validation and test rows never leak
into training and the same transform can be applied to new data later (`apply.py`).

Tabular sources (CSV, JSON lines, Parquet) stream (`tabular.py`, `file_passes.py`): an analyse pass
computes mergeable statistics batch by batch, then a transform pass encodes each batch and
writes shards as they fill, so memory stays bounded whatever the number of rows. `data.engine`
picks where the per-file work runs: in this process (`local`) or as Ray tasks (`ray`,
`ray_tasks.py`); the same functions run either way, so both write identical shards and manifests.
Text (`text.py`) streams the same way, in this process; image folders are prepared in chunks of
images, in this process (`images.py`).
"""

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pandas as pd

from stoker import __version__
from stoker.datasets import images, tabular, text
from stoker.datasets.config import DataConfig
from stoker.datasets.io import Rejects, detect_format
from stoker.datasets.manifest import FEATURES_COLUMN, MANIFEST, SPLITS, Manifest
from stoker.datasets.progress import Progress
from stoker.datasets.storage import atomic_output, fingerprint, list_sources, scratch


@dataclass
class _Encoded:
    """What the manifest says of a dataset once it is analysed, before its shards are written."""

    modality: str
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
    # The source's content hash reads every byte once more: it runs on a thread beside the
    # passes (hashlib lets go of the GIL), not after them. A failed preparation does not wait
    # for it (the interpreter would join the thread at exit: it stops at the next megabyte).
    hashing, stop = ThreadPoolExecutor(1, thread_name_prefix="fingerprint"), threading.Event()
    try:
        with ExitStack() as scratch_areas:
            return _prepare(config, progress, scratch_areas, hashing, stop)
    finally:
        stop.set()
        hashing.shutdown(wait=False, cancel_futures=True)


def _prepare(config: DataConfig, progress: Callable[[str], None] | None, scratch_areas: ExitStack,
             hashing: ThreadPoolExecutor, stop: threading.Event) -> Manifest:
    files = list_sources(config.sources, config.s3)
    source_fingerprint = hashing.submit(fingerprint, files, config.s3, stop)
    fmt = detect_format(files, config.format)
    tracker = Progress(progress, total_files=len(files))
    rejects = Rejects(quarantine=config.bad_records == "quarantine")
    source = config.sources[0] if len(config.sources) == 1 else ", ".join(config.sources)

    encoded, analysed, image_plan = _analyse(config, files, fmt, source, tracker, rejects, scratch_areas)
    tracker.stage("analyse")

    manifest = Manifest(
        stoker_version=__version__,
        source=source,
        source_fingerprint=source_fingerprint.result(),
        task=config.task,
        label=encoded.label,
        classes=encoded.classes,
        features=encoded.features,
        transform=encoded.transform,
        dropped=dict(analysed.dropped) if analysed is not None else {},
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
        _write_splits(manifest, analysed, image_plan, files, staging, config, rejects)
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


def _analyse(config: DataConfig, files, fmt: str, source: str, tracker: "Progress", rejects: Rejects,
             scratch_areas: ExitStack) -> tuple["_Encoded", Any, Any]:
    """Passes 1-2 (sample, then statistics over every row): what the prepared dataset will hold
    (`_Encoded`), the analysed tabular/text plan (None for images) and the image plan (None
    otherwise)."""
    analysed = image_plan = None
    if fmt == "images":
        image_plan = images.analyse(files, config, source, tracker.file_read)
        encoded = _Encoded("image", [FEATURES_COLUMN], image_plan.input_shape, image_plan.transform,
                           image_plan.classes, image_plan.label, {"columns": {}})
    else:
        first = tabular.sample(files, fmt, config)
        text_input = fmt == "text" or config.task == "language_modeling" or (
            config.text.column in first.columns and config.features is None
            and _is_text(first[config.text.column])
        )
        maker = text.make_plan if text_input else tabular.make_plan
        plan = maker(first, files, fmt, config, source)
        del first
        # Duplicate removal spills row hashes next to the output (shared with Ray tasks).
        spill = scratch_areas.enter_context(scratch(config.output, config.s3)) if config.duplicates == "drop" else None
        if text_input:
            analysed = text.analyse(plan, files, rejects, tracker.file_read, spill)
        else:
            analysed = tabular.analyse(plan, files, _runner(config), rejects, tracker.file_read, spill)
        report = tabular.with_balance(analysed.report, analysed.labels, analysed.classes,
                                      config.imbalance_warning_ratio)
        if text_input:
            encoded = _Encoded("text", [FEATURES_COLUMN], [config.text.max_length], analysed.transform,
                               analysed.classes, plan.label, report,
                               vocab_size=len(analysed.transform["text"]["vocabulary"]))
        else:
            encoded = _Encoded("tabular", analysed.features, [len(analysed.features)], analysed.transform,
                               analysed.classes, plan.label, report)
    return encoded, analysed, image_plan


def _write_splits(manifest: Manifest, analysed, image_plan, files, staging, config: DataConfig,
                  rejects: Rejects) -> None:
    """Pass 3: encode and write the splits into `staging` as the rows stream by, and count
    each split's classes into the manifest."""
    if analysed is None:
        manifest.splits, counts = images.write(image_plan, staging, config, rejects)
        classes = image_plan.classes
        manifest.report["split"] = tabular._realised(counts, classes, image_plan.split_method)
        report = tabular.with_balance(manifest.report, counts, classes, config.imbalance_warning_ratio)
        manifest.warnings, manifest.rejected = report.pop("warnings"), rejects.counts()
        for name, per_class in zip(SPLITS, counts, strict=True):
            manifest.splits[name]["class_counts"] = (
                {str(c): int(per_class.get(c, 0)) for c in classes} if classes is not None else None)
        return
    if manifest.modality == "text":
        manifest.splits = text.write(analysed, files, staging, config)
    elif config.engine == "ray":
        from stoker.datasets import ray_tasks

        manifest.splits = ray_tasks.write_ray(analysed, files, staging, config)
    else:
        manifest.splits = tabular.write_local(analysed, files, staging, config)
    for name, counts in tabular.class_counts(analysed).items():
        manifest.splits[name]["class_counts"] = counts


def _runner(config: DataConfig) -> tabular.Runner:
    if config.engine == "ray":
        from stoker.datasets import ray_tasks

        return ray_tasks.ray_runner
    return tabular.local_runner


# -------------------------------------------------------------------------------------- text


def _is_text(values: pd.Series) -> bool:
    sample = values.dropna().head(1000).astype("string")
    return len(sample) > 0 and bool((sample.str.contains(" ").mean()) > 0.5)


__all__ = ["prepare", "SPLITS"]
