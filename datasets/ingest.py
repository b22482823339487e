"""Feeding training workers from prepared splits, and measuring how long they wait for data.

The trainer builds one Ray Data dataset per split (`read_split`); Ray Train shards each one
across ranks with `streaming_split(equal=True)`, so every rank sees the same number of batches
(DeepSpeed's collectives would hang on an uneven last step). Each rank iterates its shard with
`iter_split`, and `WaitClock` separates time spent waiting for the next batch from the
time spent computing on it, which is what `data_wait_fraction` reports per epoch.

Per-epoch shuffling is two-level: the training split's shard files (or, once materialised, its
blocks) come in a new random order every epoch, and a local buffer of at least a few batches
(whole blocks, in practice) is emitted in a seeded random order.

Every random choice is a function of (train seed, epoch), and the worker's own of its rank too,
so the same config and seed train identically. Ray Data runs a dataset once per epoch and
counts those executions in the dataset's `DataContext`; the training split's file order, block
order and class re-sampling are seeded by Ray's `reseed_after_execution` from (seed, that
count), and `read_split` starts the count at the run's first epoch (not at whatever the driver
ran before). The split is read in file order (`preserve_order`): Ray 2.60's Parquet reader
otherwise interleaves the files of one read task in completion order, even unshuffled.

Where the waiting went, measured on 1M x 64 with 2 DeepSpeed ranks on 2 CPUs: Ray's
`iter_torch_batches` re-slices, converts and collates every batch in the worker's own process
(GIL-bound threads next to the training step), and every epoch starts with the split
coordinator's barrier, a fresh streaming executor and a first block, all inside the step loop.
So a rank here takes whole blocks from Ray, stacks each into one feature matrix in a
background thread, shuffles and gathers batches from it in a second one (one fancy index per
batch, a queue of ready tensors in front of the step), and starts the next
epoch's pass as soon as this one ends, so the barrier and executor start overlap validation
and checkpointing instead of a step.

A training split too large to cache streams from its files every epoch (`_read(streamed=True)`):
in blocks a small share of the object store, so the executor, the equal split and the ranks'
blocks in hand fit without spilling, and with a reader that plans its read tasks once, so an
epoch's first block does not wait for a per-execution file listing (issue #13).
"""

import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data import DataContext, RandomSeedConfig
from ray.data.datasource import FileShuffleConfig

from stoker.datasets.config import IngestConfig, S3Config
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, Manifest
from stoker.datasets.storage import arrow_filesystem, is_s3, join, strip_scheme
from stoker.errors import UserError
from stoker.ray_internals import set_execution_index

T = TypeVar("T")

MATERIALIZE_STORE_SHARE = 0.25
"""Largest share of the cluster's object store one split may take when `materialize: auto`."""
LOCAL_READ_MAX_BYTES = 64 << 20
"""A split to materialise up to this size (on disk) is read by the calling process with pyarrow
and put into the object store as it is (`ray.data.from_arrow`, one block per file), instead of
by a Ray Data execution. That execution's read tasks, the worker processes they wait for and
Ray Data's first-use actors cost about 3 s of every small run's and search's start on 2 CPUs
(digits: 3.2 s), for a read that takes milliseconds here; a larger split is read by tasks, in
parallel, and never passes through one process's memory."""

STREAM_BLOCK_STORE_SHARE = 1 / 32
"""Largest block of a streamed split, as a share of the smallest node's object store."""

MIN_STREAM_BLOCK_BYTES = 2**20
"""Smallest such block: below a MiB the per-block round trips to the split coordinator add up."""


def read_split(
    prepared: str | Path,
    split: str,
    read_cpus: float,
    *,
    ingest: IngestConfig | dict | None = None,
    s3: S3Config | dict | None = None,
    seed: int = 0,
    first_epoch: int = 0,
    manifest: Manifest | None = None,
    epochs: int = 2,
    can_stream: bool = True,
    cached: ray.data.Dataset | None = None,
) -> ray.data.Dataset:
    """A dataset over one split's Parquet shards; read tasks ask for `read_cpus` each.

    Reads exactly the files the manifest lists (never a directory listing, so stale objects on
    S3 are never picked up). `ingest` decides per-epoch file shuffling (training split only),
    materialising a small split in the object store, and class re-sampling; `s3` the endpoint.
    The training split's n-th execution is epoch `first_epoch + n`, shuffled and re-sampled from
    (`seed`, epoch): a run resumed at epoch k passes k and sees the same data as one that never
    stopped. (Ray Train's own restart after a worker failure re-splits this dataset, so its
    count starts at `first_epoch` again: the Ray-side order of a re-run epoch can differ.) A
    caller that has already read the manifest passes it, so it is not read once per split.
    `cached`: the split as `cache_split` read it (a search reads it once for all its trials),
    used instead of a read of its own whenever this split is to be materialised.

    `epochs`: the run's epochs (its total, also when resumed: caching decides the training
    split's per-epoch order); a split read once is not worth caching. `can_stream`: whether a read can run while the training workers hold their
    CPUs (`stoker.trainer.resources.can_stream`); when it cannot, `auto` caches every split
    before training, and a split that would have to stream is refused.
    """
    source = _SplitSource.of(prepared, split, ingest, s3, manifest)
    ingest, manifest, info, paths, filesystem = source.ingest, source.manifest, source.info, source.paths, source.filesystem
    training = split == "train"
    materialize = _should_materialize(ingest, info, split, epochs, can_stream)
    if not materialize and not can_stream:
        reason = ("data.ingest.materialize is never" if ingest.materialize == "never" else
                  "it is larger than data.ingest.materialize_max_mb or a quarter of the object store")
        raise UserError(
            f"data.ingest: the {split} split would be read during training ({reason}), but the "
            "training workers leave no node the whole free CPU that Ray Data's file listing "
            "needs, so training would wait forever; raise scaling.data_cpus or lower "
            "scaling.cpus_per_worker"
        )
    balance = source.balance
    # A materialised split is read once, so its per-epoch order comes from its blocks instead.
    shuffle = (
        FileShuffleConfig(seed=seed, reseed_after_execution=True)
        if training and ingest.shuffle_files and not materialize else None
    )
    if materialize:
        # One read; every later epoch streams blocks from the object store.
        dataset = cached if cached is not None else _materialized(source, read_cpus)
        # (The dataset's own context, a copy of the reader's: its options are set again here.)
        dataset.context.execution_options.preserve_order = True
        if training and ingest.shuffle_files:
            dataset = dataset.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    else:
        dataset = _read(paths, filesystem, read_cpus, shuffle, balance, streamed=True)
    if balance:
        dataset = dataset.map_batches(
            _Balance(manifest.class_counts, seed), batch_format="pyarrow", num_cpus=read_cpus,
            zero_copy_batch=True,
        )
    if training:
        # The first training pass reseeds as epoch `first_epoch`, whatever ran before.
        set_execution_index(dataset.context, first_epoch)
    return dataset


def cache_split(prepared: str | Path, split: str, read_cpus: float, *, ingest: IngestConfig | dict | None = None,
                s3: S3Config | dict | None = None, manifest: Manifest | None = None) -> ray.data.Dataset | None:
    """One split read and materialised in the object store, as `read_split` caches a small split
    (`cached=`), or None when the split is not one to cache (too large, `materialize: never`).

    A search reads its training split once for all its trials: every trial's own read was a Ray
    Data execution whose read tasks need worker processes started in the trial's runtime
    environment (seconds each on a small machine), and a copy per trial in the object store.
    """
    source = _SplitSource.of(prepared, split, ingest, s3, manifest)
    # The size rule alone (can_stream False: no epochs-based choice), as `auto` applies it.
    if not _should_materialize(source.ingest, source.info, split, epochs=2, can_stream=False):
        return None
    return _materialized(source, read_cpus)


def _materialized(source: "_SplitSource", read_cpus: float) -> ray.data.Dataset:
    """The split in the object store: read here when it is small (`LOCAL_READ_MAX_BYTES`), by
    Ray Data's read tasks otherwise (and for class re-sampling, whose row hashes they add)."""
    size = source.info.get("bytes")
    if source.balance or not source.paths or size is None or size > LOCAL_READ_MAX_BYTES:
        return _read(source.paths, source.filesystem, read_cpus, None, source.balance).materialize()
    dataset = ray.data.from_arrow([pq.read_table(path, filesystem=source.filesystem) for path in source.paths])
    dataset.context.execution_options.preserve_order = True  # as `_read` sets it
    return dataset


@dataclass(frozen=True)
class _SplitSource:
    """What reading one prepared split needs: the options, its manifest entry and its files."""

    ingest: IngestConfig
    manifest: Manifest
    info: dict
    paths: list[str]
    filesystem: Any
    balance: bool
    """Class re-sampling (training split only): the read adds each row's `row_hash`."""

    @classmethod
    def of(cls, prepared: str | Path, split: str, ingest: IngestConfig | dict | None, s3: S3Config | dict | None,
           manifest: Manifest | None) -> "_SplitSource":
        ingest = IngestConfig.model_validate(ingest or {})
        s3 = S3Config.model_validate(s3 or {})
        prepared = str(prepared) if is_s3(str(prepared)) else str(Path(prepared).resolve())
        manifest = manifest or Manifest.read(prepared, s3)
        paths, filesystem = split_files(prepared, split, manifest, s3)
        balance = split == "train" and ingest.resample == "balance" and bool(manifest.class_counts)
        return cls(ingest, manifest, manifest.splits[split], paths, filesystem, balance)


def stream_block_bytes() -> int | None:
    """The largest block a streamed split is read in: a small share of the smallest node's
    object store (`STREAM_BLOCK_STORE_SHARE`, at least 1 MiB), or None without a cluster.

    Blocks of Ray's default size (up to 128 MiB) move a split larger than the store through it
    a few at a time: the executor's budget, `streaming_split(equal=True)`, which holds back at
    least a block's worth of rows to even the ranks out (and splits one with a task that holds
    the whole block while it writes both halves), and each rank's block in hand did not fit
    together, so Ray spilled blocks still to be read and restored them mid-epoch (issue #13).
    """
    if not ray.is_initialized():
        return None
    stores = [node["Resources"].get("object_store_memory", 0) for node in ray.nodes() if node.get("Alive")]
    stores = [store for store in stores if store > 0]
    if not stores:
        return None
    return max(MIN_STREAM_BLOCK_BYTES, int(min(stores) * STREAM_BLOCK_STORE_SHARE))


def _read(paths: list[str], filesystem: Any, read_cpus: float, shuffle: FileShuffleConfig | None,
          row_hash: bool, *, streamed: bool = False) -> ray.data.Dataset:
    """`read_parquet` of a split's files; `streamed`: read again every epoch (not materialised).

    A streamed split is read with Ray's first Parquet datasource (`use_datasource_v2` off) in
    blocks of at most `stream_block_bytes()`. Ray 2.60's default (V2) reader lists the files and
    reads their footers in a `ListFiles` task at the start of every execution: on a busy
    2-CPU node that task (a whole CPU, often a fresh worker process) took 2.6-5 s, so each epoch's
    first block came seconds after its pass was started, more than the validation and report
    that the start-ahead overlaps (issue #13: from the third epoch on, 30-43% of a pass waiting).
    V1 lists and plans its read tasks once, here, and an epoch's first block arrives in ~0.3 s.
    Both read options are process-wide DataContext fields that `read_parquet` reads when the
    read is planned (the dataset's own context is a copy taken then), so they are set for the
    call only.
    """
    # `row_hash` (from the file and the row's place in it) keys each row's re-sampling draw, so
    # the draw does not depend on how Ray cut the split into blocks and tasks; `_PortableRowHash`
    # then keys it on the file's name in the prepared folder instead of its absolute path.
    context = DataContext.get_current()
    block_size, v2 = context.target_max_block_size, context.use_datasource_v2
    if streamed:
        context.use_datasource_v2 = False
        most = stream_block_bytes()
        if most is not None and (block_size is None or most < block_size):
            context.target_max_block_size = most
    try:
        dataset = ray.data.read_parquet(paths, filesystem=filesystem, num_cpus=read_cpus, shuffle=shuffle,
                                        include_row_hash=row_hash)
    finally:
        context.target_max_block_size, context.use_datasource_v2 = block_size, v2
    if row_hash:
        # Fused into the read tasks; the column keeps its width, so Ray cuts the same blocks.
        dataset = dataset.map_batches(_PortableRowHash(paths), batch_format="pyarrow", num_cpus=read_cpus,
                                      zero_copy_batch=True)
    # The dataset's own context (a copy of the driver's): rows in file order; Ray Train sets
    # the same for its per-epoch executions.
    dataset.context.execution_options.preserve_order = True
    return dataset


def split_files(prepared: str | Path, split: str, manifest: Manifest, s3: S3Config | None = None) -> tuple[list[str], Any]:
    """(paths, pyarrow filesystem) of the Parquet files the manifest lists for `split` (never a
    directory listing). The filesystem is None for local files; for `s3://` it carries the
    credentials resolved here (`arrow_filesystem`), so a process started without them can read."""
    prepared = str(prepared) if is_s3(str(prepared)) else str(Path(prepared).resolve())
    paths = [join(prepared, name) for name in manifest.splits[split]["files"]]
    filesystem = arrow_filesystem(prepared, s3)
    if filesystem is not None:
        paths = [strip_scheme(p) for p in paths]
    return paths, filesystem


def read_blocks(paths: list[str], filesystem: Any, features: list[str], input_shape: list[int] | None = None,
                batch_rows: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(features matrix, labels) blocks of a split's files, read in this process with pyarrow, in
    file order: no Ray Data execution, no read tasks, no worker processes. For splits a worker
    reads whole (validation and test: stoker.trainer.eval_rows); each block is at most
    `batch_rows` rows, so memory beyond what the caller keeps stays bounded."""
    shape = tuple(input_shape) if input_shape else None
    for path in paths:
        handle = pq.ParquetFile(path, filesystem=filesystem)
        columns = [*features, *([LABEL_COLUMN] if LABEL_COLUMN in handle.schema_arrow.names else [])]
        for batch in handle.iter_batches(batch_size=batch_rows, columns=columns):
            # Writable copies: torch warns on (and must not write through) read-only Arrow memory.
            block = {name: batch.column(name).to_numpy(zero_copy_only=False, writable=True) for name in columns}
            yield block_matrix(block, features, shape)


def block_matrix(block: dict[str, np.ndarray], features: list[str], shape: tuple | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One block's features as one contiguous [rows, F] matrix ([rows, *shape] for image
    pixels, [rows, length] token ids for text), and its labels (None without a label column)."""
    labels = block.get(LABEL_COLUMN)
    if list(features) == [FEATURES_COLUMN]:
        x = _stack_lists(block[FEATURES_COLUMN])
        if shape is not None and not np.issubdtype(x.dtype, np.integer):
            x = x.reshape(len(x), *shape)
    else:
        # Features are separate Parquet columns (readable by any tool); one copy per block
        # stacks them, here in a reading thread rather than once per batch in the step's.
        x = np.stack([block[f] for f in features], axis=1)
    return np.ascontiguousarray(x), labels


def as_tensors(x: np.ndarray, y: np.ndarray | None, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A block or batch as tensors: float features in `dtype`, token ids as int64 (whose labels,
    for language modelling, are the tokens themselves)."""
    if np.issubdtype(x.dtype, np.integer):
        tokens = torch.from_numpy(x.astype(np.int64, copy=False)).to(device)
        return tokens, (torch.from_numpy(y).to(device) if y is not None else tokens)
    return torch.from_numpy(x).to(device, dtype), torch.from_numpy(y).to(device)


def _should_materialize(ingest: IngestConfig, info: dict, split: str, epochs: int, can_stream: bool) -> bool:
    if ingest.materialize == "never":
        return False
    if ingest.materialize == "always":
        return True
    if can_stream and (epochs <= 1 or split != "train"):
        # `auto` caches what is read again and again: the training split of a run of several
        # epochs (shuffled and re-sampled every epoch). Caching costs a Ray Data execution per
        # split before the first step (the three digits splits: 4.4 s against 2.1 s for train
        # alone, idle machine), while the evaluation splits' files are small to re-read.
        return False
    size = info.get("bytes")
    if size is None or size > ingest.materialize_max_mb * 2**20:
        return False
    # Cached blocks stay in the object store for the whole run, next to what the streaming
    # executors and the training workers' prefetch need: a quarter of it at most, or Ray
    # would spill to disk and every epoch would read the split back from there.
    store = ray.cluster_resources().get("object_store_memory") if ray.is_initialized() else None
    return store is None or size <= store * MATERIALIZE_STORE_SHARE


class _Balance:
    """Re-sample rows so every class is equally likely, keeping the expected row count.

    Each row of class c is repeated a Poisson(mean = N / (K * count_c)) number of times: minority
    rows come back several times, majority rows are often left out, and a fresh draw each epoch
    shows the model different majority rows. A row's draw is a function of (seed, epoch, the
    row's `row_hash`) alone: the same on any cluster, however Ray blocked and placed the split,
    and wherever the prepared folder lies (`_PortableRowHash`).
    """

    def __init__(self, class_counts: dict[str, int], seed: int) -> None:
        counts = np.asarray(list(class_counts.values()), dtype=np.float64)
        present = counts > 0
        rates = np.zeros_like(counts)
        rates[present] = counts.sum() / (present.sum() * counts[present])
        self.rates = rates
        self.seed = RandomSeedConfig(seed=seed, reseed_after_execution=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from scipy.stats import poisson  # here, not at the top: it costs every driver half a second

        labels = batch[LABEL_COLUMN].to_numpy()
        epoch = self.seed.get_seed_tuple(data_context=DataContext.get_current()).execution_idx
        keys = batch[ROW_HASH_COLUMN].to_numpy().astype(np.uint64)
        batch = batch.drop_columns([ROW_HASH_COLUMN])
        rates = self.rates[labels]
        # Inverse-CDF draws from per-row uniforms in (0, 1): one row's count never depends on
        # the rows batched with it (a shared generator's stream would).
        repeats = np.where(rates > 0, poisson.ppf(_uniforms(keys, self.seed.seed, epoch), np.maximum(rates, 1e-12)), 0)
        return batch.take(np.repeat(np.arange(len(labels)), repeats.astype(np.int64)))


ROW_HASH_COLUMN = "row_hash"
"""Ray's per-row hash of (source file, row position) that `read_parquet(include_row_hash=True)` adds
(`_PortableRowHash` re-keys it on the file's name within the prepared folder)."""
# Ray 2.60's row_hash is splitmix64's finaliser of (the first 8 bytes of md5(file path) + the
# row's position in the file) (ray.data's `_compute_row_hashes`); the finaliser is a bijection,
# so these (its multipliers' inverses mod 2**64) take a hash back to that sum.
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_UNMIX_1, _UNMIX_2 = np.uint64(0x96DE1B173F119089), np.uint64(0x319642B2D24D8EC3)
_MAX_ROWS_PER_FILE = 2**40
"""Positions at or past this are not positions: no Parquet file here holds a trillion rows."""


class _PortableRowHash:
    """Re-keys each row's `row_hash` on (the file's last two path parts, e.g.
    `train/part-00000.parquet`; the row's position in it) instead of the file's absolute path.

    Ray hashes the path the split was read from, so the same prepared data in another folder (a
    benchmark's fresh temporary directory, a copy on S3) drew other re-sampling counts: the
    visit log's test ROC AUC spread over 0.81-0.85 between runs of one config (issue 23). A
    hash is taken back to (md5 seed of its file + position) and its file found among the
    split's, by the nearest seed below it; no path column is read, because Ray would count its
    bytes when it cuts blocks, and blocks cut by path length would move rows between ranks.
    A row whose file is not found (a Ray that hashes otherwise) keeps Ray's hash.
    """

    def __init__(self, paths: list[str]) -> None:
        seeds = np.array([_md5_seed(path) for path in paths], dtype=np.uint64)
        order = np.argsort(seeds)
        self.seeds = seeds[order]
        self.own = np.array([_md5_seed("/".join(path.rsplit("/", 2)[-2:])) for path in paths], dtype=np.uint64)[order]

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not batch.num_rows or not len(self.seeds):
            return batch
        hashes = batch[ROW_HASH_COLUMN].to_numpy().astype(np.uint64)
        keys = _unmix(hashes)
        # The largest seed at or below the key (index -1, the largest, for a sum that wrapped).
        found = np.searchsorted(self.seeds, keys, side="right") - 1
        with np.errstate(over="ignore"):
            positions = keys - self.seeds[found]
            portable = np.where(positions < _MAX_ROWS_PER_FILE, _mix(self.own[found] + positions), hashes)
        index = batch.schema.get_field_index(ROW_HASH_COLUMN)
        return batch.set_column(index, ROW_HASH_COLUMN, pa.array(portable, type=pa.uint64()))


def _md5_seed(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:8], byteorder="little")


def _mix(x: np.ndarray) -> np.ndarray:
    """Ray's row_hash finaliser (splitmix64's, without the increment)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _MIX_1
        x = x ^ (x >> np.uint64(27))
        x = x * _MIX_2
        return x ^ (x >> np.uint64(31))


def _unmix(x: np.ndarray) -> np.ndarray:
    """`_mix`'s inverse: each xor-shift undone by its own repetition, each multiply by the inverse."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(31)) ^ (x >> np.uint64(62))
        x = x * _UNMIX_2
        x = x ^ (x >> np.uint64(27)) ^ (x >> np.uint64(54))
        x = x * _UNMIX_1
        return x ^ (x >> np.uint64(30)) ^ (x >> np.uint64(60))


def _uniforms(keys: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One uniform in (0, 1) per key, independent across keys, seeds and epochs."""
    salt = np.random.SeedSequence([seed % 2**63, epoch]).generate_state(1, np.uint64)[0]
    x = _splitmix64(keys ^ salt)
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea and Flood 2014): a bijective 64-bit mix."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def iter_split(
    shard: "ray.data.DataIterator",
    features: list[str],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    shuffle_seed: int | tuple[int, ...] | None = None,
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

    A shuffled (training) pass that runs to the end starts the shard's next pass at once in
    the background (see `_BlockFeed`), so the next call finds its first blocks ready.
    """
    shape = tuple(input_shape) if input_shape else None
    key = (tuple(features), shape)
    feed = _take_ahead(shard, key) or _BlockFeed(shard, list(features), shape, _feed_depth(prefetch_batches))
    training = shuffle_seed is not None
    shuffle = training and shuffle_buffer_batches > 0
    rng = np.random.default_rng(shuffle_seed) if shuffle else None
    window_rows = batch_size * shuffle_buffer_batches if shuffle else batch_size

    # Shuffling, gathering and tensor conversion run in their own thread too, `ready` batches
    # ahead: the training thread's `next()` is one queue get unless the data is really late.
    ready: queue.Queue = queue.Queue(maxsize=max(prefetch_batches, 1) * 4)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        finished = False
        thread = threading.Thread(target=_batcher, args=(feed, put, batch_size, window_rows, rng, device, dtype),
                                  name="stoker-batcher", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = ready.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise value
                yield value
            finished = True
        finally:
            stop.set()
            feed.close()
            if finished and training:
                # Every rank finishes its pass about together (equal shards), so the next
                # pass's barrier in the split coordinator clears while this rank validates and
                # reports; its executor start and first blocks no longer fall into a step.
                _start_ahead(shard, key, _BlockFeed(shard, list(features), shape, feed.depth))

    return batches()


def _batcher(feed, put: Callable[[tuple], bool], batch_size: int, window_rows: int, rng, device: torch.device,
             dtype: torch.dtype) -> None:
    """iter_split's background thread: rows from `feed` into a shuffle window, out as tensor
    batches through `put` (False: the pass was abandoned), then ("end", None); an error goes
    through too, to be raised in the training thread."""
    try:
        window = _Window()
        for x, y in feed:
            window.add(x, y)
            if window.rows >= window_rows:
                for batch in window.drain(batch_size, rng, keep_tail=True):
                    if not put(("batch", as_tensors(*batch, device, dtype))):
                        return
        for batch in window.drain(batch_size, rng, keep_tail=False):
            if not put(("batch", as_tensors(*batch, device, dtype))):
                return
        put(("end", None))
    except BaseException as exc:  # re-raised in the training thread
        put(("error", exc))


def start_split(
    shard: "ray.data.DataIterator",
    features: list[str],
    *,
    input_shape: list[int] | None = None,
    prefetch_batches: int = 4,
    **_: object,
) -> None:
    """Start a shard's first pass now, in the background; the next `iter_split` on it picks it up.

    For a training loop to call on every rank before its slow set-up (engine initialisation):
    the split coordinator's actor and executor start and the first blocks arrive meanwhile,
    not inside the first epoch. Accepts the same keyword arguments as `iter_split`.
    """
    shape = tuple(input_shape) if input_shape else None
    key = (tuple(features), shape)
    with _AHEAD_LOCK:
        try:
            if shard in _AHEAD:
                return
        except TypeError:
            return
    _start_ahead(shard, key, _BlockFeed(shard, list(features), shape, _feed_depth(prefetch_batches)))


class _Window:
    """The local shuffle buffer: blocks pile up until a window holds enough rows, then the
    window is emitted in a random order (sequentially without a seed). Whole blocks are
    indexed in place, never concatenated, so a batch costs one gather of its own rows."""

    def __init__(self) -> None:
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray | None] = []
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        if len(x):
            self.xs.append(x)
            self.ys.append(y)
            self.rows += len(x)

    def drain(self, batch_size: int, rng: np.random.Generator | None, keep_tail: bool):
        """Batches of the window's rows; with `keep_tail`, the last partial batch's rows stay
        in the window for the next one (so only an epoch's very last batch is short)."""
        if not self.rows:
            return
        order = rng.permutation(self.rows) if rng is not None else np.arange(self.rows)
        full = self.rows - self.rows % batch_size if keep_tail else self.rows
        starts = np.cumsum([0] + [len(x) for x in self.xs])
        xs, ys = self.xs, self.ys
        tail = order[full:]
        self.xs, self.ys, self.rows = [], [], 0
        if len(tail):
            self.add(*_gather(xs, ys, starts, tail))
        for begin in range(0, full, batch_size):
            yield _gather(xs, ys, starts, order[begin:begin + batch_size])


def _gather(xs, ys, starts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if len(xs) == 1:
        sorted_rows = np.sort(rows)  # ascending gathers read memory in order
        return xs[0][sorted_rows], (ys[0][sorted_rows] if ys[0] is not None else None)
    chunk = np.searchsorted(starts, rows, side="right") - 1
    parts = [(c, np.sort(rows[chunk == c]) - starts[c]) for c in np.unique(chunk)]
    x = np.concatenate([xs[c][r] for c, r in parts])
    y = None if ys[0] is None else np.concatenate([ys[c][r] for c, r in parts])
    return x, y


def _feed_depth(prefetch_batches: int) -> int:
    """Blocks a feed holds ready: at least two, so one is always there while the next arrives."""
    return max(2, min(prefetch_batches, 8))


class _BlockFeed:
    """One pass over a shard, run in a background thread: Ray hands over whole blocks (no
    per-batch work in Ray's iterator), and the thread turns each into one [rows, F] feature
    matrix and a label vector, `depth` blocks ahead of the consumer.

    Starting a pass early is safe with `streaming_split`: its coordinator starts an epoch once
    every rank has asked for it, and this thread is the one that waits for that."""

    def __init__(self, shard, features: list[str], shape: tuple | None, depth: int) -> None:
        self.depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._features, self._shape = features, shape
        self._thread = threading.Thread(target=self._run, args=(shard,), name="stoker-block-feed", daemon=True)
        self._thread.start()

    def _run(self, shard) -> None:
        blocks = None
        try:
            blocks = iter(shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
            for block in blocks:
                x, y = block_matrix(block, self._features, self._shape)
                # Arrays still backed by the block's shared memory (the labels, a list column
                # reshaped: read-only views) would keep the whole block pinned in the object
                # store while they wait here, in the window or in a batch; copies (of labels,
                # a few bytes a row) let Ray free it once the next block arrives.
                item = ("block", (_owned(x), _owned(y)))
                del block, x, y  # nor does this thread keep it while it waits to hand over
                if self._stop.is_set() or not self._put(item):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it in its thread
            self._put(("error", exc))
        finally:
            if blocks is not None:
                blocks.close()  # tells the split coordinator this rank is done with the epoch

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        while True:
            try:
                kind, value = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():  # the consumer went away (an early break)
                    return
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()


# Passes started ahead, per shard object (Ray Train hands a worker the same iterator object
# every epoch); weak keys, so a finished run's shards and feeds go with them.
_AHEAD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_AHEAD_LOCK = threading.Lock()


def _start_ahead(shard, key, feed: _BlockFeed) -> None:
    with _AHEAD_LOCK:
        # A process trains one run at a time: a pass still waiting for an earlier run's
        # shard (its last epoch's, never consumed) is stopped, releasing its blocks.
        stale = [other for other in list(_AHEAD) if other is not shard]
        for other in stale:
            _AHEAD.pop(other)[1].close()
        try:
            _AHEAD[shard] = (key, feed)
        except TypeError:  # not weak-referenceable: nobody could pick the pass up
            feed.close()


def _take_ahead(shard, key) -> _BlockFeed | None:
    with _AHEAD_LOCK:
        try:
            found = _AHEAD.pop(shard, None)
        except TypeError:  # not weak-referenceable: never started ahead
            return None
    if found is None:
        return None
    started_key, feed = found
    if started_key != key:
        raise RuntimeError("iter_split: the shard's next pass was started for other features")
    return feed


def _owned(array: np.ndarray | None) -> np.ndarray | None:
    """`array`, or a copy of it if it is a read-only view (of Ray's shared memory)."""
    return array if array is None or array.flags.writeable else array.copy()


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
    """Wraps a batch iterator and accumulates the time spent blocked in `next()`.

    The fraction's denominator is the pass itself, from the clock's creation to the end of
    its iterator: work the caller does after the last batch (validation, checkpoints) is
    neither waiting nor a training step, so it must not dilute the fraction.
    """

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.first_batch_s: float | None = None
        self._started = time.perf_counter()
        self._ended: float | None = None

    def iterate(self, batches: Iterable[T]) -> Iterator[T]:
        iterator = iter(batches)
        try:
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
        finally:
            # Also on an early break (the loop closes this generator).
            self._ended = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of the pass so far (or of the whole pass, once it has ended)."""
        return (self._ended or time.perf_counter()) - self._started

    def fraction(self) -> float:
        total = self.elapsed()
        return self.wait_s / total if total > 0 else 0.0
