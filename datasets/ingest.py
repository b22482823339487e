"""Feeding training workers from prepared splits, and measuring how long they wait for data.

The trainer builds one Ray Data dataset per split (`read_split`); Ray Train shards each one
across ranks with `streaming_split(equal=True)`, so every rank sees the same number of batches
(DeepSpeed's collectives would hang on an uneven last step). Each rank iterates its shard with
`iter_batches`, and `WaitClock` separates time spent waiting for the next batch from the
time spent computing on it, which is what `data_wait_fraction` reports per epoch.
"""

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import ray.data
import torch

from stoker.datasets.manifest import LABEL_COLUMN

T = TypeVar("T")


def read_split(prepared: str | Path, split: str, read_cpus: float) -> ray.data.Dataset:
    """A lazy dataset over one split's Parquet shards; read tasks ask for `read_cpus` each."""
    return ray.data.read_parquet(str(Path(prepared).resolve() / split), num_cpus=read_cpus)


def iter_split(
    shard: "ray.data.DataIterator",
    features: list[str],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    shuffle_seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) tensor batches from one rank's shard; shuffled when a seed is given."""

    def collate(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        # Features are separate Parquet columns (readable by any tool); stack them per batch.
        x = torch.from_numpy(np.stack([batch[f] for f in features], axis=1))
        return x.to(device, dtype), torch.from_numpy(batch[LABEL_COLUMN]).to(device)

    return iter(shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=collate,
        local_shuffle_buffer_size=batch_size * 8 if shuffle_seed is not None else None,
        local_shuffle_seed=shuffle_seed,
    ))


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
