"""Image folders (`<source>/<class>/<image>`), prepared in chunks of images: memory is bounded
by a chunk, not by the dataset.

The split needs no decoding: an image's class is its folder and its key its relative path, so
the seeded hash split (exact per-class counts while small, as for tabular data) is decided from
the listing. The analyse pass decodes the training images chunk by chunk and merges per-channel
sums; the transform pass decodes every image, normalises it with those statistics and writes
shards as they fill. Images that do not decode are reported (or set aside) by the transform
pass, which sees every image.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stoker.datasets import file_passes, tabular
from stoker.datasets import split as sp
from stoker.datasets import transform as tf
from stoker.datasets.config import DataConfig
from stoker.datasets.io import Rejects, read_images
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, SPLITS
from stoker.datasets.storage import SourceFile, Staging
from stoker.errors import UserError

CHUNK_IMAGES = 256
"""Images decoded at a time."""


@dataclass
class ImagePlan:
    files: list[SourceFile]
    codes: np.ndarray
    """Split code per file (0 train, 1 validation, 2 test)."""
    class_names: list[str]
    classes: list[str] | None
    transform: dict
    input_shape: list[int]
    label: str
    split_method: str


def analyse(files: list[SourceFile], config: DataConfig, source: str, on_file=None) -> ImagePlan:
    class_names = []
    for item in files:
        parts = item.relative.split("/")
        if len(parts) < 2:
            raise UserError(
                f"data.source: {item.uri}: image folders need one sub-folder per class (<source>/<class>/<image>)"
            )
        class_names.append(parts[-2])
    if len(files) < 3:
        raise UserError(f"{source}: only {len(files)} images; need at least 3 to split")
    relatives = pd.Series([f.relative for f in files])
    u = sp.value_hashes(config.split.seed, relatives)
    stratify = config.task == "classification" and config.split.stratify
    labels = pd.Series(class_names)
    classes_u = sp.value_hashes(0, labels) if stratify else None
    exact = len(files) <= file_passes.EXACT_SPLIT_MAX_ROWS
    if exact:
        names = {int(c): n for c, n in zip(classes_u, class_names, strict=True)} if stratify else {}
        thresholds = sp.exact_thresholds(u, classes_u, names, config.split)
    else:
        histogram = sp.CutHistogram()
        histogram.add(u, classes_u)
        thresholds = sp.histogram_thresholds(histogram, config.split)
    codes = sp.assign(u, classes_u, thresholds)
    classes = None
    if config.task == "classification":
        classes = sorted(set(labels[codes == 0]))
        if len(classes) < 2:
            raise UserError(
                f"data.label: {len(classes)} class in the training split ({', '.join(map(repr, classes))}); "
                "classification needs at least two class folders"
            )
        unseen = set(labels[codes != 0]) - set(classes)
        if unseen:
            raise UserError(f"data.label: class {sorted(unseen)[0]!r} has zero training images after splitting; "
                            "add images of it or drop it")
    # Per-channel sums of the training images on the [0, 1] scale, merged chunk by chunk.
    total = np.zeros(config.image.channels)
    squares = np.zeros(config.image.channels)
    pixels_per_channel = 0
    train = [f for f, code in zip(files, codes, strict=True) if code == 0]
    throwaway = Rejects(quarantine=True)  # the transform pass reports undecodable images
    for start in range(0, len(train), CHUNK_IMAGES):
        _, _, pixels = read_images(train[start:start + CHUNK_IMAGES], config, throwaway, on_file)
        scaled = pixels.astype(np.float64) / 255.0
        total += scaled.sum(axis=(0, 2, 3))
        squares += (scaled ** 2).sum(axis=(0, 2, 3))
        pixels_per_channel += scaled.shape[0] * scaled.shape[2] * scaled.shape[3]
    if pixels_per_channel == 0:
        raise UserError(f"data.source: {source}: no training image decoded")
    mean = total / pixels_per_channel
    std = np.sqrt(np.maximum(squares / pixels_per_channel - mean ** 2, 0.0))
    std[std == 0] = 1.0
    shape = [config.image.channels, *config.image.size]
    transform = {"image": {"mean": mean.tolist(), "std": std.tolist(), "shape": shape}}
    return ImagePlan(files, codes, class_names, classes, transform, shape, config.label or "class",
                     "exact" if exact else "histogram")


def write(plan: ImagePlan, staging: Staging, config: DataConfig, rejects: Rejects) -> tuple[dict, list[Counter]]:
    """Decode, normalise and write every image; (manifest splits, label counts per split)."""
    import pyarrow as pa

    row_bytes = 4 * int(np.prod(plan.input_shape)) + 8
    size = config.rows_per_shard if config.target_shard_mb is None else max(
        1, min(config.rows_per_shard, int(config.target_shard_mb * 2**20 / row_bytes)))
    writers = [tabular.ShardWriter(staging, name, size) for name in SPLITS]
    counts = [Counter(), Counter(), Counter()]
    index = {c: i for i, c in enumerate(plan.classes)} if plan.classes is not None else None
    for start in range(0, len(plan.files), CHUNK_IMAGES):
        chunk = plan.files[start:start + CHUNK_IMAGES]
        paths, names, pixels = read_images(chunk, config, rejects)
        if not paths:
            continue
        code_of = dict(zip((f.uri for f in chunk), plan.codes[start:start + CHUNK_IMAGES], strict=True))
        codes = np.array([code_of[p] for p in paths])
        features = tf.apply_image(pixels, plan.transform["image"])
        labels = np.array([index[n] for n in names], dtype=np.int64) if index is not None else np.zeros(len(names))
        for code in range(3):
            chosen = codes == code
            if not chosen.any():
                continue
            counts[code].update(n for n, c in zip(names, chosen, strict=True) if c)
            writers[code].add(pa.table({FEATURES_COLUMN: tf.list_column(features[chosen], pa.float32()),
                                        LABEL_COLUMN: labels[chosen]}))
    schema = pa.schema([pa.field(FEATURES_COLUMN, pa.list_(pa.float32())), pa.field(LABEL_COLUMN, pa.int64())])
    splits = {name: writer.close(schema) for name, writer in zip(SPLITS, writers, strict=True)}
    if sum(info["rows"] for info in splits.values()) == 0:
        raise UserError(f"data.source: {config.sources[0]}: no image decoded")
    return splits, counts
