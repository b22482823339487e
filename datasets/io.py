"""Reading raw tables and writing directories atomically."""

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stoker.errors import UserError

_CSV_OPTIONS = pacsv.ConvertOptions(strings_can_be_null=True)


def input_files(source: Path) -> list[Path]:
    """The files behind a source path: the file itself, or every file in a directory."""
    if not source.exists():
        raise UserError(f"data.source: {source}: no such file or directory")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise UserError(f"data.source: {source}: directory has no data files")
        return files
    return [source]


def detect_format(source: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = (next(iter(input_files(source))) if source.is_dir() else source).suffix.lower()
    if suffix in (".csv", ".txt"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise UserError(f"data.format: cannot tell the format of {source} from its extension; set csv or parquet")


def read_table(source: Path, fmt: str) -> pa.Table:
    """Read a CSV or Parquet source, turning the reader's errors into one line naming the file."""
    tables = []
    for path in input_files(source):
        try:
            if fmt == "csv":
                # Empty fields are missing values in string columns too, not "" categories.
                tables.append(pacsv.read_csv(path, convert_options=_CSV_OPTIONS))
            else:
                tables.append(pq.read_table(path))
        except (pa.ArrowInvalid, OSError) as exc:
            # pyarrow's CSV errors carry the row ("Row #12: Expected 65 columns, got 3").
            message = str(exc).strip().splitlines()[0]
            raise UserError(f"{path}: {message}") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as exc:
        raise UserError(f"{source}: files have different schemas: {exc}") from None


def fingerprint(source: Path) -> str:
    """A content hash of every input file (names relative to the source, then bytes)."""
    digest = hashlib.sha256()
    for path in input_files(source):
        digest.update(str(path.relative_to(source) if source.is_dir() else path.name).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    On any error the temporary directory is removed, so a failed run leaves nothing behind and an
    earlier good output stays as it was.
    """
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        # Two renames: the old output is moved aside, never half-overwritten.
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
