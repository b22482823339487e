"""Process environment variables changed for the length of a block, then put back.

The one helper for every package (and the tests): it imports nothing of stoker's, so any layer
may use it. Ray's and Tune's own settings are still set only by `stoker.ray_internals`, which
uses this helper for the ones it sets for a while.
"""

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


@contextmanager
def patched_environ(settings: Mapping[str, str | None]) -> Iterator[None]:
    """While the block runs, each variable of `settings` is set to its value, or unset where
    the value is None; after it (raised or not) each is what it was before, unset included."""
    saved = {name: os.environ.get(name) for name in settings}
    _apply(settings)
    try:
        yield
    finally:
        _apply(saved)


def _apply(settings: Mapping[str, str | None]) -> None:
    for name, value in settings.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
