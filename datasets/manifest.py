"""manifest.json: what a prepared dataset holds and how it was made.

The trainer reads it to size the model (features in, classes out) and to find the shards; the
fingerprint ties every run to the exact input bytes it was trained on.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stoker.errors import UserError

MANIFEST = "manifest.json"
LABEL_COLUMN = "label"
SPLITS = ("train", "validation", "test")


@dataclass
class Manifest:
    stoker_version: str
    source: str
    source_fingerprint: str
    task: str
    label: str
    classes: list | None
    features: list[str]
    transform: dict[str, Any]
    dropped: dict[str, int]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return len(self.features)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(
                f"data.output: no prepared dataset at {directory} ({MANIFEST} missing); "
                "run `stoker data prepare CONFIG` first"
            ) from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        try:
            return cls(**raw)
        except TypeError as exc:
            raise UserError(f"{path}: not a stoker manifest: {exc}") from None
