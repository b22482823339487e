"""Streaming preparation's per-file work as Ray tasks (`data.engine: ray`), for tabular sources
(text and image folders stream in the driver's process whichever the engine).

The same functions as the local engine (`file_passes.py`) run in tasks, one per source file and
pass, spread over the cluster: the split-key pass, the analyse pass (each task returns its
file's partial statistics; the driver merges them in file order) and the transform pass (each
task encodes its file batch by batch and writes every shard that lies wholly inside its rows).
A shard that straddles files is written by a small task that receives the pieces the
transform tasks kept (object references: the driver never fetches them). The driver holds the
plan and merged statistics, never rows, and the shards and manifest are the local engine's.

Errors a task finds in the data come back as the same one-line `UserError` the local engine
raises (returned as values, so Ray does not wrap them in a `RayTaskError`).
"""

from collections.abc import Iterator

import pyarrow as pa
import ray

from stoker.datasets import file_passes, tabular
from stoker.datasets.config import DataConfig
from stoker.datasets.manifest import SPLITS
from stoker.datasets.storage import SourceFile, Staging
from stoker.errors import UserError


def require_ray() -> None:
    if not ray.is_initialized():
        raise UserError("data.engine: ray needs a Ray cluster; connect first (the CLI does) or use engine: local")


@ray.remote
def _per_file(function, item: SourceFile, index: int, plan: file_passes.Plan, *args) -> tuple:
    try:
        return file_passes.per_file(function, item, index, plan, *args), None
    except UserError as exc:
        return None, str(exc)


def ray_runner(function, files: list[SourceFile], plan: file_passes.Plan, *args) -> Iterator:
    """`tabular.local_runner` with one Ray task per file (all submitted at once; results handed
    on in file order as they are fetched); errors name the first bad file in order."""
    require_ray()
    plan_ref = ray.put(plan)
    # SPREAD: the files' tasks go round the nodes (Ray's default packs a node before it spills).
    task = _per_file.options(scheduling_strategy="SPREAD")
    refs = [task.remote(function, item, index, plan_ref, *args) for index, item in enumerate(files)]
    return _in_order(refs)


def _in_order(refs: list) -> Iterator:
    for i, ref in enumerate(refs):
        result, error = ray.get(ref)
        refs[i] = None  # the driver holds one file's result at a time
        if error is not None:
            for other in refs[i + 1:]:
                ray.cancel(other)
            raise UserError(error)
        yield result


class _RangeWriter:
    """One file's rows of one split, which are the split's rows [start, start + count): whole
    shards are written, pieces of shards shared with other files are kept for `_stitch`."""

    def __init__(self, staging: Staging, split: str, start: int, total: int, size: int) -> None:
        self.staging, self.split, self.total, self.size = staging, split, total, size
        self.position = start
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.written: dict[int, tuple[int, int]] = {}
        self.pieces: dict[int, pa.Table] = {}

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        while self.buffered:
            shard = self.position // self.size
            end = min((shard + 1) * self.size, self.total)
            need = end - self.position
            if self.buffered < need and not final:
                return
            take = min(need, self.buffered)
            rows = pa.concat_tables(self.buffer)
            piece, rest = rows.slice(0, take), rows.slice(take)
            if self.position == shard * self.size and take == end - shard * self.size:
                name = tabular.shard_name(self.split, shard)
                self.written[shard] = (take, tabular.write_shard(self.staging, name, piece))
            else:
                self.pieces[shard] = piece.combine_chunks()
            self.position += take
            self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows


@ray.remote(num_returns=2)
def _transform(item: SourceFile, index: int, analysed: tabular.Analysed, starts: list[int], totals: list[int],
               size: int, staging: Staging) -> tuple:
    writers = [_RangeWriter(staging, name, starts[i], totals[i], size) for i, name in enumerate(SPLITS)]
    try:
        for code, table in file_passes.transform_file_tables(item, index, analysed.plan, analysed.transform,
                                                        analysed.classes):
            writers[code].add(table)
    except UserError as exc:
        return {"error": str(exc)}, {}
    for writer in writers:
        writer.close()
    written = {(w.split, k): v for w in writers for k, v in w.written.items()}
    pieces = {(w.split, k): v for w in writers for k, v in w.pieces.items()}
    return {"error": None, "written": written}, pieces


@ray.remote
def _stitch(staging: Staging, split: str, shard: int, schema: pa.Schema, *pieces: dict) -> tuple[int, int]:
    parts = [p[(split, shard)] for p in pieces if (split, shard) in p]
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return table.num_rows, tabular.write_shard(staging, tabular.shard_name(split, shard), table)


def write_ray(analysed: tabular.Analysed, files: list[SourceFile], staging: Staging, config: DataConfig) -> dict:
    """Pass 3 as Ray tasks; returns the manifest's `splits` (rows, bytes, files per split)."""
    require_ray()
    size = tabular.rows_per_shard(analysed, config)
    totals = [sum(rows[i] for rows in analysed.file_rows) for i in range(3)]
    starts, running = [], [0, 0, 0]
    for rows in analysed.file_rows:
        starts.append(list(running))
        running = [a + b for a, b in zip(running, rows, strict=True)]
    shared = ray.put(analysed)
    transform = _transform.options(scheduling_strategy="SPREAD")
    tasks = [transform.remote(item, index, shared, starts[index], totals, size, staging)
             for index, item in enumerate(files)]
    written: dict = {}
    for meta_ref, _ in tasks:
        meta = ray.get(meta_ref)
        if meta["error"] is not None:
            raise UserError(meta["error"])
        written.update(meta["written"])
    schema = tabular.output_schema(analysed)
    stitched = {}
    for i, split in enumerate(SPLITS):
        for shard in range(max(1, -(-totals[i] // size))):
            if (split, shard) in written:
                continue
            low, high = shard * size, min((shard + 1) * size, totals[i])
            overlapping = [pieces for index, (_, pieces) in enumerate(tasks)
                           if starts[index][i] < high and starts[index][i] + analysed.file_rows[index][i] > low]
            stitched[(split, shard)] = _stitch.remote(staging, split, shard, schema, *overlapping)
    written.update(zip(stitched, ray.get(list(stitched.values())), strict=True))
    splits = {}
    for i, split in enumerate(SPLITS):
        shards = sorted(k for s, k in written if s == split)
        splits[split] = {"rows": sum(written[(split, k)][0] for k in shards),
                         "bytes": sum(written[(split, k)][1] for k in shards),
                         "files": [tabular.shard_name(split, k) for k in shards]}
        assert splits[split]["rows"] == totals[i], (split, splits[split]["rows"], totals[i])
    return splits
