"""Files written for others to read appear whole or not at all.

Each is written to a temporary sibling (a unique name, so two writers never share one) and
renamed over its target, which is atomic within one filesystem: a reader (another process, a
crash-resumed run, `stoker runs`) sees the old file or the new one, never half of one. The one
helper for every package: it imports nothing of stoker's, so any layer may use it.
"""

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_file(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path that replaces `target` only if the block succeeds; it
    ends in `suffix` for writers that choose a format by extension (`.png` for savefig)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> Path:
    """Write `text` to `target` atomically; returns the target."""
    with atomic_file(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_json(target: str | Path, value: Any, indent: int | None = 2) -> Path:
    """`value` as JSON (one trailing newline; unknown types as strings), written atomically."""
    return write_text(target, json.dumps(value, indent=indent, default=str) + "\n")


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling directory that replaces `target` only if the block
    succeeds: a reader sees the old directory or the new one, never a half-written one. An
    existing `target` is moved aside first and removed after (two renames, never an overwrite
    in place); a failed block leaves `target` as it was."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
