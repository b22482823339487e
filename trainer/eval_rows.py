"""A validation or test split in worker memory, cut into equal numbers of batches per rank.

Ray Train's `streaming_split(equal=True)` drops the rows that do not divide evenly among the
ranks (27 rows on 2 workers were scored as 26), and starts a Ray Data execution, with its
coordinator barrier, at every evaluation. So the evaluation splits are not split by Ray: every
rank reads the whole split once (in file order, the same order on every rank), keeps only its
own contiguous share (rank r: rows [r*N//W, (r+1)*N//W), every row in exactly one share), and
evaluates that share from memory at every later validation.

The rank reads the split's files itself, with pyarrow (`stoker.datasets.ingest.read_blocks`),
not through Ray Data: on a small cluster, the read tasks of two splits times every rank queued
for worker processes ahead of the training split's first blocks (digits on 2 CPUs: the first
training batch arrived 11.6 s into epoch 0; read directly, 0.006 s).

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters inside the
forward, a collective): a rank whose share is one row shorter runs its last batch padded with
a row that `valid` excludes from the metrics.
"""

import math
import threading
from collections.abc import Iterator
from typing import Any

import torch

from stoker.datasets.ingest import as_tensors, read_blocks

LOAD_BATCH_ROWS = 4096


class EvalRows:
    """One split's share for this rank, loaded in a background thread from `start()`."""

    def __init__(self, files: tuple[list[str], Any], features: list[str], rows: int, rank: int, world_size: int,
                 dtype: torch.dtype, input_shape: list[int] | None = None) -> None:
        """`files`: the split's (paths, pyarrow filesystem), `stoker.datasets.ingest.split_files`."""
        self.rows, self.rank, self.world_size = rows, rank, world_size
        self.begin, self.end = rank * rows // world_size, (rank + 1) * rows // world_size
        self._args = (files, features, dtype, input_shape)
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._pad: tuple[torch.Tensor, torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "EvalRows":
        """Read the split in the background (it overlaps engine set-up and the first epoch)."""
        self._thread = threading.Thread(target=self._load_safely, name="stoker-eval-rows", daemon=True)
        self._thread.start()
        return self

    def _load_safely(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # re-raised in the training thread by `batches`
            self._error = exc

    def _load(self) -> None:
        (paths, filesystem), features, dtype, input_shape = self._args
        xs, ys, seen = [], [], 0
        for block in read_blocks(paths, filesystem, features, input_shape, LOAD_BATCH_ROWS):
            x, y = as_tensors(*block, torch.device("cpu"), dtype)
            if self._pad is None:
                self._pad = (x[:1], y[:1])
            lo, hi = max(self.begin - seen, 0), min(self.end - seen, len(x))
            if hi > lo:
                xs.append(x[lo:hi])
                ys.append(y[lo:hi])
            seen += len(x)
        if seen != self.rows:
            raise RuntimeError(f"the split has {seen} rows but its manifest says {self.rows}; prepare it again")
        self._x = torch.cat(xs) if xs else None
        self._y = torch.cat(ys) if ys else None

    def _ready(self, device: torch.device) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
        elif self._pad is None:
            self._load()
        if self._pad is not None and self._pad[0].device != device:
            # Read on the CPU (the engine, and so the device, may not exist yet); moved once.
            self._pad = (self._pad[0].to(device), self._pad[1].to(device))
            if self._x is not None and self._y is not None:
                self._x, self._y = self._x.to(device), self._y.to(device)

    def batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(x, y, valid): the first `valid` rows of each batch are this rank's; every rank
        gets the same number of batches."""
        self._ready(device)
        largest_share = math.ceil(self.rows / self.world_size)
        mine = self.end - self.begin
        for start in range(0, largest_share, batch_size):
            valid = max(0, min(batch_size, mine - start))
            if valid:
                assert self._x is not None and self._y is not None
                yield self._x[start:start + valid], self._y[start:start + valid], valid
            else:
                assert self._pad is not None
                yield self._pad[0], self._pad[1], 0
