"""Benchmark flags: a bad value exits 2 with one line naming the flag and the values it takes.

argparse already names the flag ("argument --rows: ..."); the types below say what the flag
takes, and OneLineParser leaves out the usage block that argparse prints before it.
"""

import argparse
import sys
from collections.abc import Callable, Iterable


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: exit 2 with one line naming the flag (argparse's own message), no usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"takes an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = at_least(1)


def int_list(minimum: int = 1, allowed: Iterable[int] | None = None) -> Callable[[str], list[int]]:
    """A comma-separated list of integers, each >= `minimum` or, with `allowed`, one of those."""
    allowed = sorted(allowed) if allowed is not None else None
    what = (f"one or more of {','.join(map(str, allowed))}" if allowed is not None
            else f"integers >= {minimum}") + ", comma-separated"

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            values = []
        ok = values and all(v in allowed if allowed is not None else v >= minimum for v in values)
        if not ok:
            raise argparse.ArgumentTypeError(f"takes {what}, got {text!r}")
        return values

    return parse


def name_list(allowed: Iterable[str]) -> Callable[[str], list[str]]:
    """A comma-separated list of names, each one of `allowed`."""
    allowed = list(allowed)

    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",")]
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"takes one or more of {','.join(allowed)}, comma-separated, got {text!r}")
        return values

    return parse
