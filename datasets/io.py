"""Reading raw files (CSV, JSON lines, Parquet, text, image folders) into tables.

Every reader error becomes one line naming the file (and the line, for rows). Under
`bad_records: quarantine` a broken row or image is set aside in a `Rejects` list with its
reason instead, and the rest of the file is kept.
"""

import io
import json
import posixpath
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from stoker.atomic import atomic_file  # noqa: F401 - re-exported: the one atomic-write helper
from stoker.datasets.config import DataConfig
from stoker.datasets.storage import SourceFile, filesystem, is_s3, strip_scheme
from stoker.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEXT_SUFFIXES = (".txt", ".text")


@dataclass
class Rejects:
    """Records that could not be read, with where they came from and why."""

    quarantine: bool
    records: list[dict] = field(default_factory=list)

    def add(self, file: str, line: int | None, reason: str, detail: str, content: str = "",
            row: int | None = None) -> None:
        if not self.quarantine:
            # The file, then where, then what is wrong: "data.csv: row 2 (line 3): CSV parse
            # error: Expected 3 columns, got 2: '3,4'".
            at = f" {where(row, line)}:" if row is not None or line is not None else ""
            raise UserError(f"{file}:{at} {detail}")
        self.records.append({"file": file, "row": row, "line": line, "reason": reason, "detail": detail,
                             "content": content[:1000]})

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.records))


def where(row: int | None, line: int | None = None) -> str:
    """How every message names a record: "row N (line M)", the 1-based data row (header and
    blank lines not counted) and, for text formats, the line of the file it starts on."""
    if row is None:
        return f"line {line}"
    return f"row {row}" + (f" (line {line})" if line is not None else "")


def check_utf8(data: bytes, uri: str) -> None:
    """Fail with the byte offset and line of the first byte that is not UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{uri}: not UTF-8: byte {exc.start} (line {line}) is {data[exc.start:exc.start + 1]!r}; "
            "save the file as UTF-8"
        ) from None


def detect_format(files: list[SourceFile], declared: str) -> str:
    if declared != "auto":
        return declared
    suffixes = {posixpath.splitext(f.uri)[1].lower() for f in files}
    if suffixes <= set(IMAGE_SUFFIXES):
        return "images"
    if suffixes <= {".csv"}:
        return "csv"
    if suffixes <= {".jsonl", ".json", ".ndjson"}:
        return "jsonl"
    if suffixes <= {".parquet", ".pq"}:
        return "parquet"
    if suffixes <= set(TEXT_SUFFIXES):
        return "text"
    raise UserError(
        f"data.format: cannot tell the format of {files[0].uri} from its extension "
        f"({', '.join(sorted(suffixes))}); set csv, jsonl, parquet, images or text"
    )


@contextmanager
def open_source(item: SourceFile, config: DataConfig):
    fs = filesystem(item.uri, config.s3)
    path = strip_scheme(item.uri) if is_s3(item.uri) else item.uri
    try:
        with fs.open(path, "rb") as handle:
            yield handle
    except UserError:
        raise
    except PermissionError as exc:
        raise UserError(f"{item.uri}: access denied: {exc}") from None


def read_tables(
    files: list[SourceFile], fmt: str, config: DataConfig, rejects: Rejects,
    on_file: Callable[[SourceFile, int], None] | None = None,
) -> pa.Table:
    """Read every file of a tabular or text source and check that they share one schema."""
    tables: list[tuple[SourceFile, pa.Table]] = []
    for item in files:
        table = read_file(item, fmt, config, rejects)
        tables.append((item, table))
        if on_file:
            on_file(item, table.num_rows)
    return combine_tables(tables)


def read_file(item: SourceFile, fmt: str, config: DataConfig, rejects: Rejects) -> pa.Table:
    """One file of a tabular or text source as an Arrow table (bad records to `rejects`)."""
    readers = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}
    with open_source(item, config) as handle:
        try:
            return readers[fmt](handle, item, config, rejects)
        except (pa.ArrowInvalid, OSError) as exc:
            raise file_error(item.uri, exc) from None


def file_error(uri: str, exc: BaseException) -> UserError:
    """A reader's exception as one line that names the file."""
    # pyarrow names an in-memory source '<Buffer>'; the file is named first instead.
    message = str(exc).strip().splitlines()[0].replace(" '<Buffer>'", "")
    return UserError(f"{uri}: {message}")


def combine_tables(tables: list[tuple[SourceFile, pa.Table]]) -> pa.Table:
    """The files' tables as one, in order; every file must have the first one's columns."""
    first_file, first = tables[0]
    for item, table in tables[1:]:
        if set(table.column_names) != set(first.column_names):
            extra = sorted(set(table.column_names) ^ set(first.column_names))
            raise UserError(
                f"{item.uri}: files have different schemas: column {extra[0]!r} is in only one of "
                f"{item.uri} and {first_file.uri}"
            )
    try:
        # Permissive: int64 in one CSV and double in the next is one float column; int vs
        # string is a real conflict and fails.
        return pa.concat_tables([t.select(first.column_names) for _, t in tables], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"{first_file.uri}: files have different schemas: {exc}") from None


def _read_csv(handle, item: SourceFile, config: DataConfig, rejects: Rejects) -> pa.Table:
    data = handle.read()
    bad: list = []

    def invalid(row) -> str:
        bad.append(row)
        return "skip"

    options = pacsv.ParseOptions(invalid_row_handler=invalid)
    convert = csv_convert_options(config)
    table = pacsv.read_csv(io.BytesIO(data), parse_options=options, convert_options=convert)
    if bad and bad[0].number is None:
        # Row numbers are only known to a single-threaded parse; redo it just for the report.
        bad.clear()
        table = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(use_threads=False),
                               parse_options=options, convert_options=convert)
    for row in bad:
        # Arrow numbers the file's lines from 1 with the header; the data row is one less.
        rejects.add(item.uri, row.number, "ragged_row",
                    f"CSV parse error: Expected {row.expected_columns} columns, got {row.actual_columns}: '{row.text[:80]}'",
                    row.text, row=row.number - 1)
    if any(pa.types.is_binary(f.type) for f in table.schema):
        # Arrow reads a column with bytes that are not UTF-8 as binary instead of failing.
        check_utf8(data, item.uri)
    return table


def csv_convert_options(config: DataConfig) -> pacsv.ConvertOptions:
    # `data.na_values` are missing in every column, and empty fields are missing in string
    # columns too, not "" categories.
    return pacsv.ConvertOptions(null_values=list(config.na_values), strings_can_be_null=True)


def _read_jsonl(handle, item: SourceFile, config: DataConfig, rejects: Rejects) -> pa.Table:
    data = handle.read()
    try:
        table = pajson.read_json(io.BytesIO(data))
    except pa.ArrowInvalid:
        pass
    else:
        try:
            # The JSON reader passes bytes that are not UTF-8 into string columns unchecked.
            table.validate(full=True)
        except pa.ArrowInvalid:
            check_utf8(data, item.uri)
        return table
    check_utf8(data, item.uri)
    # The fast reader gives up on the first bad line without saying which; parse line by line
    # to name it (fail) or to keep every good line (quarantine).
    records = []
    row = 0
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            rejects.add(item.uri, number, "invalid_json", f"invalid JSON line: {exc.msg}", line, row=row)
            continue
        if not isinstance(record, dict):
            rejects.add(item.uri, number, "invalid_json", "JSON line is not an object", line, row=row)
            continue
        records.append(record)
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"{item.uri}: {exc}") from None


def _read_parquet(handle, item: SourceFile, config: DataConfig, rejects: Rejects) -> pa.Table:
    return pq.read_table(handle)


def _read_text(handle, item: SourceFile, config: DataConfig, rejects: Rejects) -> pa.Table:
    data = handle.read()
    check_utf8(data, item.uri)
    lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    return pa.table({config.text.column: pa.array(lines, pa.string())})


def read_images(
    files: list[SourceFile], config: DataConfig, rejects: Rejects,
    on_file: Callable[[SourceFile, int], None] | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
    """Decode `<class>/<image>` files into (paths, class names, uint8 [N, C, H, W])."""
    from PIL import Image, UnidentifiedImageError

    height, width = config.image.size
    mode = "L" if config.image.channels == 1 else "RGB"
    paths, classes, pixels = [], [], []
    for item in files:
        parts = item.relative.split("/")
        if len(parts) < 2:
            raise UserError(
                f"data.source: {item.uri}: image folders need one sub-folder per class "
                "(<source>/<class>/<image>)"
            )
        try:
            with open_source(item, config) as handle:
                image = Image.open(io.BytesIO(handle.read()))
                image.load()
            image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            rejects.add(item.uri, None, "unreadable_image", f"image does not decode: {exc}")
            continue
        array = np.asarray(image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        paths.append(item.uri)
        classes.append(parts[-2])
        pixels.append(array)
        if on_file:
            on_file(item, 1)
    stacked = np.stack(pixels) if pixels else np.zeros((0, config.image.channels, height, width), np.uint8)
    return paths, classes, stacked
