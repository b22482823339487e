"""Driver-side logging of rank 0's reported metrics: metrics.jsonl, TensorBoard, MLflow.

Everything here runs in the driver from Ray Train's `after_report` callback, which sees rank
0's metrics once per epoch: nothing is logged twice by several ranks, and a restarted run
only reports epochs after its checkpoint, so the logs stay free of duplicates.
"""

import json
import logging
import math
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray.train

from stoker.atomic import write_text
from stoker.errors import UserError
from stoker.trainer.run_dir import Records


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
    the run directory, so a resumed run continues the same MLflow run).

    The default store is SQLite in `<run dir>/mlflow.db`: a local file, and the backend MLflow
    develops (its `./mlruns` file store is in maintenance mode and refused by default since
    MLflow 3.7). Idempotent: an (metric, epoch) pair already in the run is never logged again,
    so epochs that run a second time after a restart (a fallback from a corrupt checkpoint)
    do not show up twice. Ray Train pickles callbacks into its controller, so the client is
    rebuilt there on first use.
    """

    def __init__(self, run_dir: Path, uri: str | None, name: str, params: dict[str, Any]) -> None:
        _import_mlflow()
        records = Records(run_dir)
        self.uri = uri or f"sqlite:///{records.mlflow_db.resolve()}"
        self._client_handle = None
        self._logged: set[tuple[str, int]] | None = None
        id_file = records.mlflow_run_id
        client = self._client()
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            try:
                client.get_run(self.run_id)
                return
            except MlflowException:
                pass  # not in this store (the tracking URI changed): start a new MLflow run

        with _mlflow_errors():
            experiment = client.get_experiment_by_name("stoker")
            experiment_id = experiment.experiment_id if experiment else client.create_experiment("stoker")
            self.run_id = client.create_run(experiment_id, run_name=name).info.run_id
            client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in redact(params).items()])
        write_text(id_file, self.run_id + "\n")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client_handle": None, "_logged": None}

    def _client(self):
        if self._client_handle is None:
            mlflow = _import_mlflow()
            with _mlflow_errors():
                self._client_handle = mlflow.MlflowClient(tracking_uri=self.uri)
        return self._client_handle

    def _already_logged(self, client) -> set[tuple[str, int]]:
        logged = set()
        for key in client.get_run(self.run_id).data.metrics:
            logged.update((key, m.step) for m in client.get_metric_history(self.run_id, key))
        return logged

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        client = self._client()
        if self._logged is None:
            self._logged = self._already_logged(client)
        epoch, now = int(record["epoch"]), int(time.time() * 1000)
        fresh = [(k, v) for k, v in _scalars(record).items() if (k, epoch) not in self._logged]
        if fresh:
            client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in fresh])
            self._logged.update((k, epoch) for k, _ in fresh)

    def close(self) -> None:
        pass


def _import_mlflow():
    try:
        import mlflow
    except ImportError:
        raise UserError("train.tracking.mlflow: the mlflow package is not installed "
                        "(pip install 'stoker[mlflow]', or mlflow-skinny)") from None
    # MLflow and alembic announce every SQLite schema migration at INFO.
    for noisy in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return mlflow


@contextmanager
def _mlflow_errors():
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"train.tracking.mlflow_uri: {first}") from None


_SECRET_KEY = re.compile(r"password|passwd|secret|token|credential|api_?key|access_?key", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Params with anything credential-like hidden: values of secret-sounding keys, and the
    user:password part of URIs (an MLflow or S3 endpoint URI may carry one)."""
    out = {}
    for key, value in params.items():
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            value = "***"
        elif isinstance(value, str):
            value = _URI_USERINFO.sub("***@", value)
        out[key] = value
    return out


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: value}


class RunLog(ray.train.UserCallback):
    """Appends each epoch's rank-0 metrics to metrics.jsonl and the trackers as soon as the
    epoch is reported, and each worker failure that makes Ray Train restart the group to
    `events` (one JSON line: ranks, cause, the epoch whose checkpoint it resumes from, attempt
    k of `max_failures`), which the driver turns into one line for the user."""

    def __init__(self, records: Records, trackers: list | None = None,
                 max_failures: int = 0, checkpoint_epoch: int | None = None) -> None:
        self.records = records
        self.trackers = trackers or []
        self.max_failures = max_failures
        self._last_epoch: int | None = None
        self._checkpoint_epoch = checkpoint_epoch
        self._failures = 0
        self._draining = False

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        if not worker_exceptions or self._draining:
            return  # during a drain, workers on the drained node go with it: not a failure
        self._failures += 1
        ranks = sorted(worker_exceptions)
        lines = [line.strip() for line in str(worker_exceptions[ranks[0]]).splitlines() if line.strip()]
        cause = (lines[0] if lines else type(worker_exceptions[ranks[0]]).__name__)[:200]
        event = {"event": "worker_failed", "ranks": ranks, "cause": cause, "resume_epoch": self._checkpoint_epoch,
                 "attempt": self._failures, "max_failures": self.max_failures}
        with open(self.records.events_path, "a") as handle:
            handle.write(json.dumps(event) + "\n")

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        record = dict(metrics[0])
        if "preempted" in record:
            # A drain's just-in-time checkpoint (stoker.trainer.preemption): an event, not an epoch.
            self._draining = True
            cause = record["preempted"].get("cause", "drain")
            event = {"event": "preempted" if cause == "drain" else "stopped", **record["preempted"],
                     "world_size": record.get("world_size"),
                     "checkpoint": checkpoint.path if checkpoint is not None else None}
            with open(self.records.events_path, "a") as handle:
                handle.write(json.dumps(event) + "\n")
            return
        self._draining = False
        if checkpoint is not None:
            record["checkpoint"] = checkpoint.path
            self._checkpoint_epoch = int(record["epoch"])
        notes = record.pop("straggler_notes", None)  # an event, said once, not an epoch metric
        if notes:
            with open(self.records.events_path, "a") as handle:
                handle.writelines(json.dumps({"event": "straggler", "epoch": record["epoch"], "line": note}) + "\n"
                                  for note in notes)
        self._drop_from(int(record["epoch"]))
        with open(self.records.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def _drop_from(self, epoch: int) -> None:
        """A restart after a worker died runs the epochs since the last saved checkpoint again
        (`train.checkpoint.every`): their first records go, so each epoch is listed once."""
        last, self._last_epoch = self._last_epoch, epoch
        if last is None or epoch <= last:
            self.records.drop_metrics(from_epoch=epoch)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
