"""What each Ray Train worker is told: one frozen plan, built once on the driver."""

from dataclasses import dataclass, field
from typing import Any

from stoker.trainer.config import ModelConfig, TrainConfig
from stoker.trainer.models import InputSpec
from stoker.trainer.targets import TargetScale


@dataclass(frozen=True)
class WorkerPlan:
    """Everything `train_loop_per_worker` needs, checked and computed by `build_trainer`."""

    run_name: str
    """Written into every checkpoint, so a checkpoint copied from another run is recognised."""
    train: TrainConfig
    model: ModelConfig
    spec: InputSpec
    """The model's input and output shapes (from the dataset manifest)."""
    features: list[str]
    """Feature columns of the prepared splits, in the model's input order."""
    num_classes: int | None
    metric: str
    """`train.metric`, resolved: the validation metric that picks the best epoch."""
    deepspeed: dict[str, Any]
    """The DeepSpeed JSON, exactly as written to the run directory."""
    eval_rows: dict[str, int]
    """Rows of the validation and test splits (every one of them is scored)."""
    eval_files: dict[str, tuple[list[str], Any]]
    """The validation and test splits' (Parquet paths, pyarrow filesystem): every rank reads
    them itself (stoker.trainer.eval_rows)."""
    class_weights: list[float] | None = None
    target_scale: TargetScale | None = None
    """Regression: the training split's label mean and std (stoker.trainer.targets)."""
    ingest: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `stoker.datasets.ingest.iter_split` (prefetch, shuffle buffer, shape)."""
    train_rows: int = 0
    """Rows of the training split: a worker group of another size than planned (an elastic
    resize, a resume from a drain's checkpoint) works out its steps per epoch from it."""
    stop_flag: str | None = None
    """Name of the driver's `StopFlag` actor (stoker.trainer.stop_flag): a stopping driver
    raises it and the workers checkpoint before they end. None: no such driver (Tune trials)."""
    score_test: bool = True
    """Score the test split at each new best epoch (the run's test metrics and error analysis).
    Search trials do not: a search selects on validation, and the test split is for the model
    trained from the chosen configuration (`best.yaml`)."""

    @property
    def task(self) -> str:
        return self.spec.task
