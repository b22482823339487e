"""The one module of stoker.cluster that uses Ray's private names, checked against the installed
Ray at import: a Ray outside the tested series fails here with one line, not deep inside a run.
"""

import functools

import ray

from stoker.errors import UserError

# The same pin and wording as stoker.tune.ray_internals: whichever seam is imported first stops
# the command with exit 2 and one line naming both versions.
WRITTEN_FOR = "2.60.0"

if ray.__version__ != WRITTEN_FOR:
    raise UserError(f"ray {ray.__version__} is installed, but stoker.cluster was written for ray {WRITTEN_FOR} "
                    f"(it relies on Ray internals); install ray=={WRITTEN_FOR} (pip install -c constraints.txt -e .)")

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
