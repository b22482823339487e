"""The `data` section of the run config."""

from typing import Literal

from pydantic import Field, model_validator

from stoker.schema import StrictModel


class SplitConfig(StrictModel):
    """How rows are divided between the train, validation and test splits."""

    train: float = Field(0.7, gt=0, lt=1)
    """Fraction of rows in the training split."""
    validation: float = Field(0.15, gt=0, lt=1)
    """Fraction of rows in the validation split (early stopping, best checkpoint)."""
    test: float = Field(0.15, gt=0, lt=1)
    """Fraction of rows in the test split (final, untouched evaluation)."""
    seed: int = 0
    """Seed of the shuffle, so the same input always splits the same way."""
    stratify: bool = True
    """Keep class proportions equal across splits (classification only)."""

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitConfig":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + validation + test must sum to 1, got {total:g}"
            )
        return self


class DataConfig(StrictModel):
    """Where the raw data is, how to clean and encode it, and where the prepared splits go."""

    source: str
    """Raw input: a CSV or Parquet file, or a directory of Parquet files."""
    format: Literal["auto", "csv", "parquet"] = "auto"
    """Input format; `auto` goes by the file extension."""
    label: str
    """Name of the target column."""
    task: Literal["classification", "regression"] = "classification"
    """Classification predicts a class from the label's distinct values; regression a number."""
    features: list[str] | None = None
    """Feature columns to keep; default: every column but the label."""
    categorical: list[str] | None = None
    """Columns to one-hot encode; default: the feature columns that are not numeric."""
    missing: Literal["drop", "mean", "median", "mode", "constant"] = "drop"
    """What to do with missing feature values: drop the row, or impute (statistics from the
    training split only). Rows with a missing label are always dropped."""
    fill_value: float = 0.0
    """The value imputed when `missing: constant`."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """Train/validation/test fractions (default 70/15/15)."""
    output: str
    """Directory the prepared dataset (Parquet shards per split + manifest.json) is written to."""
    rows_per_shard: int = Field(100_000, gt=0)
    """Rows per Parquet file; several shards let Ray Data read in parallel."""
