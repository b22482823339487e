"""The `data` section of the run config."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from stoker.strict_model import StrictModel

MissingPolicy = Literal["drop", "mean", "median", "mode", "constant"]

NA_VALUES = ("", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "None")
"""The default `data.na_values`: what spreadsheets, pandas and databases write for missing."""


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
    group_by: str | None = None
    """Column whose equal values always land in the same split (e.g. a patient or user id), so
    related rows never straddle train and test. Grouped splits are not stratified."""

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitConfig":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + validation + test must sum to 1, got {total:g}"
            )
        return self


class S3Config(StrictModel):
    """Where S3 lives. Credentials are never configured here: they come from the standard AWS
    chain (environment variables, shared credentials file, instance/pod role)."""

    endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (MinIO, Ceph, a local test server); default: AWS,
    or the `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` environment variable."""
    region: str | None = None
    """Region of the bucket; default: the AWS chain's (`AWS_DEFAULT_REGION`, profile)."""


class TextConfig(StrictModel):
    """Cleaning and tokenising a text column (or text files) into token ids."""

    column: str = "text"
    """Column that holds the text (text files become one row per non-empty line in `text`)."""
    lowercase: bool = True
    """Lower-case before tokenising."""
    strip_punctuation: bool = True
    """Replace punctuation with spaces before tokenising."""
    stop_words: Literal["none", "english"] | list[str] = "none"
    """Words removed before building the vocabulary: none, scikit-learn's English list, or
    your own list."""
    max_length: int = Field(128, ge=1)
    """Tokens per row; longer rows are truncated, shorter ones padded with id 0."""
    vocab_size: int = Field(20_000, ge=2)
    """Most frequent training-split tokens kept (including the pad and unknown ids 0 and 1)."""
    min_frequency: int = Field(1, ge=1)
    """Tokens seen fewer times than this in the training split map to the unknown id."""


class ImageConfig(StrictModel):
    """Decoding image folders (`<source>/<class>/*.png|jpg`) into fixed-size tensors."""

    size: tuple[int, int] = (32, 32)
    """Height and width every image is resized to."""
    channels: Literal[1, 3] = 3
    """1 converts to greyscale, 3 to RGB."""


class IngestConfig(StrictModel):
    """How training workers read the prepared splits (`stoker.datasets.ingest`)."""

    shuffle_files: bool = True
    """Visit the training split's shards in a new random order every epoch."""
    shuffle_buffer_batches: int = Field(8, ge=0)
    """Local shuffle buffer, in batches, on top of the file order; 0 turns it off."""
    prefetch_batches: int = Field(4, ge=0)
    """Batches each worker fetches ahead while it computes on the current one."""
    materialize: Literal["auto", "always", "never"] = "auto"
    """Keep a split in Ray's object store after the first read instead of re-reading Parquet
    every epoch; `auto` does it for the training split of a run of more than one epoch when it
    is at most `materialize_max_mb` and at most a quarter of the cluster's object store, and
    for every split that fits when the workers leave no node a whole free CPU (Ray Data needs
    one to read during training); `always` for every split."""
    materialize_max_mb: float = Field(1024, ge=0)
    """Largest split (uncompressed bytes in the manifest) that `materialize: auto` caches."""
    resample: Literal["none", "balance"] = "none"
    """Re-sample the training split every epoch so each class appears equally often
    (minority classes drawn with replacement, majority classes thinned); the epoch keeps its
    size. The other remedy, class weights in the loss, is the trainer's."""


class DataConfig(StrictModel):
    """Where the raw data is, how to clean and encode it, and where the prepared splits go."""

    source: str | list[str]
    """Raw input: a file, a directory, a glob (`data/*.csv`), or a list of them; local paths
    or `s3://bucket/key` URIs."""
    format: Literal["auto", "csv", "jsonl", "parquet", "images", "text"] = "auto"
    """Input format; `auto` goes by the file extension (a directory of class sub-folders of
    PNG/JPEG files is `images`; `.txt` files are `text`)."""
    label: str | None = None
    """Name of the target column; for image folders the class is the sub-folder name and this
    names the manifest's label (default `class`). Not used by `language_modeling`."""
    task: Literal["classification", "regression", "language_modeling"] = "classification"
    """Classification predicts a class from the label's distinct values, regression a number,
    language_modeling the next token of a text (no label)."""
    features: list[str] | None = None
    """Feature columns to keep; default: every column but the label (and the group column)."""
    categorical: list[str] | None = None
    """Columns to encode; default: the feature columns that are not numeric."""
    encoding: Literal["onehot", "ordinal"] = "onehot"
    """One column per training category (unknown categories: all zeros), or one column of
    category ids (unknown categories: -1)."""
    scale: Literal["standard", "minmax", "none"] = "standard"
    """Numeric columns: zero mean/unit variance, [0, 1] from the training min/max, or as is."""
    derived: dict[str, str] = Field(default_factory=dict)
    """New numeric features from expressions over columns, e.g. `bmi: weight / height ** 2`;
    + - * / ** %, parentheses, numbers and log, log1p, exp, sqrt, abs."""
    missing: MissingPolicy = "drop"
    """What to do with missing feature values: drop the row, or impute (statistics from the
    training split only). Rows with a missing label are always dropped."""
    missing_by_column: dict[str, MissingPolicy] = Field(default_factory=dict)
    """Per-column overrides of `missing`."""
    fill_value: float | str = 0.0
    """The value imputed when the policy is `constant`."""
    duplicates: Literal["keep", "drop"] = "keep"
    """Drop rows that repeat an earlier row exactly (counted as `duplicate`)."""
    na_values: list[str] = Field(default_factory=lambda: list(NA_VALUES))
    """Strings that mean "missing" in any column (exact match, case-sensitive): such a cell is
    a missing value, handled by `missing`. In a numeric column any other string that does not
    parse as a number is a bad value (see `bad_values`); set `[]` to count only empty cells (and
    JSON/Parquet nulls) as missing."""
    bad_values: Literal["fail", "drop"] = "fail"
    """A numeric value that is not a finite number (a string outside `na_values` that does not
    parse, `inf` or `-inf`, in a feature or a regression label): fail naming the file, row and
    column, or drop the row (counted as `bad_value`)."""
    bad_records: Literal["fail", "quarantine"] = "fail"
    """A ragged CSV row, an invalid JSON line or an image that does not decode: fail naming the
    file and line, or write it to `<output>/rejected/` with the reason and go on."""
    text: TextConfig = Field(default_factory=TextConfig)
    """Text cleaning and tokenisation (`format: text`, or a text column with `text.column`
    present in the table)."""
    image: ImageConfig = Field(default_factory=ImageConfig)
    """Image decoding (`format: images`)."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """Train/validation/test fractions (default 70/15/15)."""
    imbalance_warning_ratio: float = Field(10.0, ge=1)
    """Warn when the largest class has more than this many times the rows of the smallest."""
    output: str
    """Directory or `s3://` prefix the prepared dataset (Parquet shards per split +
    manifest.json) is written to."""
    rows_per_shard: int = Field(100_000, gt=0)
    """Rows per Parquet file; several shards let Ray Data read in parallel."""
    target_shard_mb: float | None = Field(None, gt=0)
    """Target uncompressed size of a shard in MiB; when set it decides the rows per shard
    (capped by `rows_per_shard`)."""
    engine: Literal["local", "ray"] = "local"
    """Where preparation's per-file work runs. Tabular sources stream either way (analyse
    pass, then transform pass, over Arrow record batches; memory bounded by a batch). `local`:
    in this process. `ray`: each pass runs one Ray task per source file on the connected
    cluster, and shards are written by the tasks (a local output directory must then be
    shared storage); the driver only merges statistics. Both engines write the same shards
    and manifest. Image folders and text stream in this process whichever the engine."""
    s3: S3Config = Field(default_factory=S3Config)
    """S3 endpoint and region (never credentials)."""
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    """How training workers read the prepared splits."""

    @field_validator("derived")
    @classmethod
    def _derived_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, expression in value.items():
            if not expression.strip():
                raise ValueError(f"{name}: empty expression")
        return value

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)
