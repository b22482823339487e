"""What the listing verbs (`runs list`, `models list`, `jobs list`, `runs compare`) print: one
JSON object per line with `--json`, for scripts, else an aligned table with a header row."""

import json
from collections.abc import Callable, Sequence
from typing import Any

Column = tuple[str, Callable[[dict[str, Any]], Any]]
"""A table column: its header and how to get its cell from one record's JSON object."""


def print_records(records: Sequence[dict[str, Any]], columns: Sequence[Column], as_json: bool) -> None:
    if as_json:
        for record in records:
            print(json.dumps(record, default=str))
        return
    print_table([tuple(header for header, _ in columns),
                 *(tuple("-" if (v := cell(r)) is None else str(v) for _, cell in columns) for r in records)])


def print_table(rows: Sequence[Sequence[Any]]) -> None:
    """Rows of cells, the first being the header, left-aligned in columns two spaces apart."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def workers_cell(scaling: dict[str, Any] | None) -> str | None:
    """A run's workers as the listings show them: `2`, or with its resizes `2>1>2`
    (stoker.trainer.run_dir.Records.scaling)."""
    if not scaling:
        return None
    sizes = [resize["workers_from"] for resize in scaling["resizes"]] + [scaling["workers"]]
    return ">".join(str(size) for size in sizes)


def progress_cell(progress: dict[str, Any] | None) -> str | None:
    """A running run's place as the listings show it: `epoch 6/20, 2843 samples/s, ETA 1m10s`
    (stoker.trainer.run_dir.Records.progress; epochs counted from 1)."""
    if not progress:
        return None
    parts = [f"epoch {progress['epoch'] + 1}/{progress['epochs']}"]
    if progress["samples_per_s"] is not None:
        parts.append(f"{progress['samples_per_s']:.0f} samples/s")
    if progress["eta_s"] is not None:
        minutes, seconds = divmod(round(progress["eta_s"]), 60)
        parts.append(f"ETA {minutes}m{seconds:02d}s" if minutes else f"ETA {seconds}s")
    return ", ".join(parts)
