"""manifest.json: what a prepared dataset holds and how it was made.

The trainer reads it to size the model (features or input shape in, classes out) and to find
the shards; the fingerprint ties every run to the exact input bytes it was trained on. On S3 the
manifest is also the commit marker: a dataset exists once its manifest does.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from stoker.errors import UserError

MANIFEST = "manifest.json"
LABEL_COLUMN = "label"
FEATURES_COLUMN = "features"
"""Image and text splits keep their whole input in this one list column."""
SPLITS = ("train", "validation", "test")


@dataclass
class Manifest:
    stoker_version: str
    source: str
    source_fingerprint: str
    task: str
    label: str | None
    classes: list | None
    features: list[str]
    transform: dict[str, Any]
    dropped: dict[str, int]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    modality: str = "tabular"
    """tabular | image | text."""
    input_shape: list[int] = field(default_factory=list)
    """Shape of one example's input: [num_features], [C, H, W] or [max_length]."""
    vocab_size: int | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    """Records set aside under `bad_records: quarantine`, by reason (see rejected/)."""
    report: dict[str, Any] = field(default_factory=dict)
    """Class balance per split and per-column distributions of the training split."""
    warnings: list[str] = field(default_factory=list)
    source_format: str = "csv"
    source_files: int = 1

    def __post_init__(self) -> None:
        if not self.input_shape:
            self.input_shape = [len(self.features)]

    @property
    def num_features(self) -> int:
        return len(self.features)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    @property
    def class_counts(self) -> dict[str, int] | None:
        """Training-split rows per class, for class weights in the loss."""
        return self.splits.get("train", {}).get("class_counts")

    def to_json(self) -> str:
        # Strict JSON: NaN and Infinity are not JSON (other parsers refuse them), so a
        # statistic that is not finite is written as null.
        return json.dumps(_finite(asdict(self)), indent=2, default=str, allow_nan=False) + "\n"

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(self.to_json())

    @classmethod
    def read(cls, directory: str | Path, s3=None, key: str = "data.output") -> "Manifest":
        """The manifest of the prepared dataset at a local path or `s3://` URI; `key` names
        where the path came from in errors (a config key or a CLI option)."""
        from stoker.datasets.storage import is_s3, join, read_text, storage_errors

        path = join(str(directory), MANIFEST)
        try:
            with storage_errors(key, path, pass_missing=True):
                raw = json.loads(read_text(path, s3) if is_s3(path) else Path(path).read_text())
        except FileNotFoundError:
            raise UserError(
                f"{key}: no prepared dataset at {directory} ({MANIFEST} missing); "
                "run `stoker data prepare CONFIG` first"
            ) from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        known = {f.name for f in fields(cls)}
        try:
            # Fields added by newer stoker versions are ignored, not fatal.
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise UserError(f"{path}: not a stoker manifest: {exc}") from None


def _finite(value: Any) -> Any:
    """`value` with every float that is not finite replaced by None (numpy scalars as Python)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
