"""The one module of stoker.cluster that uses Ray's private names, checked against the installed
Ray at import: a Ray outside the tested series fails here with one line, not deep inside a run.
"""

import functools

import ray

TESTED_SERIES = "2.60."

if not ray.__version__.startswith(TESTED_SERIES):
    raise ImportError(
        f"stoker.cluster.raycompat: Ray {ray.__version__} is installed; stoker is tested with "
        f"Ray {TESTED_SERIES}x (pyproject.toml, constraints.txt)"
    )

from ray._private import worker as _worker  # noqa: E402 - after the version check


def driver_output_to_stderr() -> None:
    """Send everything Ray prints in this (driver) process to stderr: the raylet's warnings
    (`(raylet) WARNING: ...`, printed to stdout by the driver's error listener whatever
    `log_to_driver` says) and, with `log_to_driver`, the workers' output. stoker's stdout is its
    own result (tables, one JSON document with `--json`), which a pipe must be able to parse.

    Both of Ray's printers look `print_to_stdstream` up when they print (the error listener) or
    bind it at `ray.init` (the log printer), so this must run before `ray.init`; it is idempotent.
    """
    original = _worker.print_to_stdstream
    if getattr(original, "_stoker_to_stderr", False):
        return

    @functools.wraps(original)
    def to_stderr(data, ignore_prefix: bool):
        return original({**data, "is_err": True}, ignore_prefix)

    to_stderr._stoker_to_stderr = True
    _worker.print_to_stdstream = to_stderr


def print_as_ray(lines: list[str], pid: str = "raylet") -> None:
    """Print `lines` the way Ray's driver prints a raylet's message (for tests of the above)."""
    _worker.print_to_stdstream({"lines": lines, "pid": pid, "is_err": False}, ignore_prefix=False)
