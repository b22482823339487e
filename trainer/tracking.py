"""Driver-side logging of rank 0's reported metrics: metrics.jsonl, TensorBoard, MLflow.

Everything here runs in the driver from Ray Train's `after_report` callback, which sees rank
0's metrics once per epoch: nothing is logged twice by several ranks, and a restarted run
only reports epochs after its checkpoint, so the logs stay free of duplicates.
"""

import json
import math
from pathlib import Path
from typing import Any

import ray.train

from stoker.errors import UserError


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch" and math.isfinite(float(v))
    }


class TensorBoardLog:
    """Event files in `<run dir>/tensorboard`, one scalar per metric per epoch."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        epoch = int(record["epoch"])
        if self.writer is None:
            # purge_step: TensorBoard drops events at or after this epoch from earlier event
            # files, so a resumed run shows each epoch once.
            self.writer = SummaryWriter(str(self.directory), purge_step=epoch)
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, epoch)
        for point in record.get("step_validations", ()):
            for key, value in _scalars(point).items():
                if key != "step":
                    self.writer.add_scalar(f"steps/{key}", value, int(point["step"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowLog:
    """Params once, metrics per epoch, into one MLflow run per stoker run (its id is kept in
    the run directory, so a resumed run continues the same MLflow run)."""

    def __init__(self, run_dir: Path, uri: str | None, name: str, params: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:
            raise UserError("train.tracking.mlflow: the mlflow package is not installed (pip install mlflow)") from None
        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=uri or (run_dir / "mlruns").resolve().as_uri())
        id_file = run_dir / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
        else:
            experiment = self.client.get_experiment_by_name("stoker")
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("stoker")
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            for key, value in params.items():
                self.client.log_param(self.run_id, key, str(value)[:500])
            id_file.write_text(self.run_id + "\n")

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.client.log_metric(self.run_id, key, value, step=int(record["epoch"]))

    def close(self) -> None:
        pass


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: value}


class RunLog(ray.train.UserCallback):
    """Appends each epoch's rank-0 metrics to metrics.jsonl and the trackers as soon as the
    epoch is reported."""

    def __init__(self, path: str, trackers: list | None = None) -> None:
        self.path = path
        self.trackers = trackers or []

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        record = dict(metrics[0])
        if checkpoint is not None:
            record["checkpoint"] = checkpoint.path
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
