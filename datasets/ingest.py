"""Feeding training workers from prepared splits, and measuring how long they wait for data.

The trainer builds one Ray Data dataset per split (`read_split`); Ray Train shards each one
across ranks with `streaming_split(equal=True)`, so every rank sees the same number of batches
(DeepSpeed's collectives would hang on an uneven last step). Each rank iterates its shard with
`iter_split`, and `WaitClock` separates time spent waiting for the next batch from the
time spent computing on it, which is what `data_wait_fraction` reports per epoch.

Per-epoch shuffling is two-level: the training split's shard files (or, once materialised, its
blocks) come in a new random order every epoch, and a local buffer of a few batches shuffles
rows within that stream. Batches are collated (stacked into tensors) in Ray's prefetch threads,
so the training step only waits when data is really late.
"""

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.datasource import FileShuffleConfig

from stoker.datasets.config import IngestConfig, S3Config
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, Manifest
from stoker.datasets.storage import arrow_filesystem, is_s3, join, strip_scheme

T = TypeVar("T")


def read_split(
    prepared: str | Path,
    split: str,
    read_cpus: float,
    *,
    ingest: IngestConfig | dict | None = None,
    s3: S3Config | dict | None = None,
    seed: int = 0,
    manifest: Manifest | None = None,
) -> ray.data.Dataset:
    """A dataset over one split's Parquet shards; read tasks ask for `read_cpus` each.

    Reads exactly the files the manifest lists (never a directory listing, so stale objects on
    S3 are never picked up). `ingest` decides per-epoch file shuffling (training split only),
    materialising a small split in the object store, and class re-sampling; `s3` the endpoint.
    A caller that has already read the manifest passes it, so it is not read once per split.
    """
    ingest = IngestConfig.model_validate(ingest or {})
    s3 = S3Config.model_validate(s3 or {})
    prepared = str(prepared) if is_s3(str(prepared)) else str(Path(prepared).resolve())
    manifest = manifest or Manifest.read(prepared, s3)
    info = manifest.splits[split]
    paths = [join(prepared, name) for name in info["files"]]
    filesystem = arrow_filesystem(prepared, s3)
    if filesystem is not None:
        paths = [strip_scheme(p) for p in paths]
    training = split == "train"
    shuffle = (
        FileShuffleConfig(seed=seed, reseed_after_execution=True)
        if training and ingest.shuffle_files else None
    )
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, num_cpus=read_cpus, shuffle=shuffle)
    if _should_materialize(ingest, info):
        # One read; every later epoch streams blocks from the object store.
        dataset = dataset.materialize()
        if training and ingest.shuffle_files:
            dataset = dataset.randomize_block_order()
    if training and ingest.resample == "balance" and manifest.class_counts:
        dataset = dataset.map_batches(
            _Balance(manifest.class_counts), batch_format="pyarrow", num_cpus=read_cpus,
            zero_copy_batch=True,
        )
    return dataset


def _should_materialize(ingest: IngestConfig, info: dict) -> bool:
    if ingest.materialize == "never":
        return False
    if ingest.materialize == "always":
        return True
    size = info.get("bytes")
    return size is not None and size <= ingest.materialize_max_mb * 2**20


class _Balance:
    """Re-sample rows so every class is equally likely, keeping the expected row count.

    Each row of class c is repeated a Poisson(mean = N / (K * count_c)) number of times: minority
    rows come back several times, majority rows are often left out, and a fresh draw each epoch
    shows the model different majority rows.
    """

    def __init__(self, class_counts: dict[str, int]) -> None:
        counts = np.asarray(list(class_counts.values()), dtype=np.float64)
        present = counts > 0
        rates = np.zeros_like(counts)
        rates[present] = counts.sum() / (present.sum() * counts[present])
        self.rates = rates

    def __call__(self, batch: pa.Table) -> pa.Table:
        labels = batch[LABEL_COLUMN].to_numpy()
        repeats = np.random.default_rng().poisson(self.rates[labels])
        return batch.take(np.repeat(np.arange(len(labels)), repeats))


def iter_split(
    shard: "ray.data.DataIterator",
    features: list[str],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    shuffle_seed: int | None = None,
    *,
    input_shape: list[int] | None = None,
    prefetch_batches: int = 4,
    shuffle_buffer_batches: int = 8,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) tensor batches from one rank's shard; shuffled when a seed is given.

    Tabular: x is `dtype` [B, num_features]. Image and text splits (`features == ["features"]`):
    x is `dtype` [B, *input_shape] for float pixels ([B, C, H, W] with the manifest's
    `input_shape`) and int64 [B, max_length] for token ids. Language-modelling splits have no
    label column: y is x itself, and the trainer shifts it.
    """
    list_input = list(features) == [FEATURES_COLUMN]
    shape = tuple(input_shape) if input_shape else None

    def collate(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        if list_input:
            x = _stack_lists(batch[FEATURES_COLUMN])
            if np.issubdtype(x.dtype, np.integer):
                tokens = torch.from_numpy(x.astype(np.int64, copy=False)).to(device)
                labels = batch.get(LABEL_COLUMN)
                return tokens, (torch.from_numpy(labels).to(device) if labels is not None else tokens)
            if shape is not None:
                x = x.reshape(len(x), *shape)
        else:
            # Features are separate Parquet columns (readable by any tool); stack them per batch.
            x = np.stack([batch[f] for f in features], axis=1)
        return torch.from_numpy(x).to(device, dtype), torch.from_numpy(batch[LABEL_COLUMN]).to(device)

    shuffle = shuffle_seed is not None and shuffle_buffer_batches > 0
    return iter(shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=collate,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=batch_size * shuffle_buffer_batches if shuffle else None,
        local_shuffle_seed=shuffle_seed if shuffle else None,
    ))


def _stack_lists(column: np.ndarray) -> np.ndarray:
    """A list column as one [B, K] array (Ray hands variable-length lists over as objects)."""
    if column.dtype != object:
        return column.reshape(len(column), -1)
    return np.stack(column) if len(column) else np.zeros((0, 0), np.float32)


def ingest_kwargs(ingest: IngestConfig | dict | None, manifest: Manifest) -> dict:
    """The keyword arguments of `iter_split` that come from the config and the manifest."""
    ingest = IngestConfig.model_validate(ingest or {})
    return {
        "input_shape": manifest.input_shape,
        "prefetch_batches": ingest.prefetch_batches,
        "shuffle_buffer_batches": ingest.shuffle_buffer_batches,
    }


class WaitClock:
    """Wraps a batch iterator and accumulates the time spent blocked in `next()`."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.first_batch_s: float | None = None
        self._started = time.perf_counter()

    def iterate(self, batches: Iterable[T]) -> Iterator[T]:
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.wait_s += time.perf_counter() - began
                return
            now = time.perf_counter()
            self.wait_s += now - began
            if self.first_batch_s is None:
                self.first_batch_s = now - self._started
            yield batch

    def fraction(self) -> float:
        total = time.perf_counter() - self._started
        return self.wait_s / total if total > 0 else 0.0
