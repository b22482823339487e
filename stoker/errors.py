"""Errors that the CLI turns into exit codes.

A `UserError` is something the user can fix (bad config, bad data, too few CPUs): the CLI prints
its one-line message and exits 2, with no traceback unless `--debug`. Anything else is a bug or
an infrastructure failure and exits 1.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file, key, row or column."""


class ConfigKeyError(ValueError):
    """Raised inside a config model's validator for a check across keys: the config loader
    reports it under `key` (the key at fault) instead of the model's own location."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
