"""Helpers for tests that run `stoker tune` in a process of its own, to kill or interrupt it."""

import os
import subprocess
import sys
import time

from tests.conftest import REPO


def start_tune(path, *args: str) -> subprocess.Popen:
    """`stoker tune PATH ARGS` in a new session (so its whole process group can be killed),
    output and errors together, line by line."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "stoker", "tune", str(path), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_until(driver: subprocess.Popen, *markers: str, timeout_s: float = 400) -> list[str]:
    """The driver's lines up to one containing each marker in turn (or up to the deadline)."""
    seen: list[str] = []
    pending = list(markers)
    deadline = time.monotonic() + timeout_s
    for line in driver.stdout:
        seen.append(line)
        if pending and pending[0] in line:
            pending.pop(0)
        if not pending or time.monotonic() > deadline:
            break
    return seen


def _schema():
    from stoker.config import RunConfig

    return RunConfig


# The searched run's type: check_space and trial_footprint validate values as it.
SCHEMA = _schema()
"""How tune/ validates run configs (stoker.config, above it, passes this in)."""
