"""The run directory: where it lives (a local or shared path, or an `s3://` prefix) and the
records in it. Every record's file name is spelled here and nowhere else; the rest of stoker
reads and writes records through `RunDir`.

On local storage the run directory is one directory that Ray Train's checkpoints and stoker's
records share, exactly as before. On S3 they part: Ray Train persists checkpoints straight to
`s3://bucket/prefix/<name>/` (through the pyarrow filesystem `ray_storage` hands it), while the
driver writes its records (config.yaml, metrics.jsonl, tensorboard/, report.html, ...) to a
local staging directory, mirrored to the same S3 prefix: downloaded before a run resumes,
uploaded when it ends (or stops). The staging directory is
`$STOKER_STAGING_DIR/<bucket>/<prefix>/<name>`, by default under `~/.cache/stoker/runs`.

Credentials come from the AWS chain; the endpoint and region from the config's `data.s3`.
"""

import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

from stoker.atomic import write_json, write_text
from stoker.datasets.config import S3Config
from stoker.datasets.storage import (
    filesystem,
    is_s3,
    join,
    ray_filesystem,
    storage_errors,
    strip_scheme,
)
from stoker.errors import UserError
from stoker.trainer.ranking import pick_checkpoint
from stoker.trainer.run_lease import LEASE

STAGING_ENV = "STOKER_STAGING_DIR"

# What Ray Train keeps in a run directory: checkpoint_<time>/ directories, its
# checkpoint_manager_snapshot.json (what a resume reads) and .validate_storage_marker. They stay
# on S3; everything else there is stoker's.
_RAY_PREFIX = "checkpoint_"
_RAY_MARKER = ".validate_storage_marker"
# stoker.trainer.checkpoints.STATE_FILE, named here so the CLI can import this module without
# importing torch (which that module does).
_STATE_FILE = "stoker_state.json"

# The records stoker writes into a run directory (beside Ray Train's checkpoints).
CONFIG = "config.yaml"
"""The resolved run config, as trained."""
DATASET = "dataset.json"
"""The prepared dataset's path, fingerprint, row counts, input shape and classes."""
DEEPSPEED = "deepspeed_config.json"
"""The DeepSpeed config the workers ran with (reusable with plain DeepSpeed)."""
METRICS = "metrics.jsonl"
"""One line per epoch, appended as epochs finish."""
EVENTS = "events.jsonl"
"""Worker failures that made Ray Train restart the worker group."""
FINAL = "final_metrics.json"
"""The best epoch's validation and test metrics, written when the run ends."""
DRIVER = "driver.json"
"""Which process drives the run (host and pid), so a dead driver's run is not `running` for ever."""
REPORT = "report.html"
"""The HTML report (learning curves, confusion matrix, ...), its PNGs beside it."""
TENSORBOARD = "tensorboard"
"""TensorBoard event files (a directory)."""
MLFLOW_DB = "mlflow.db"
"""The default MLflow store (train.tracking.mlflow)."""
MLFLOW_RUN_ID = "mlflow_run_id"
"""The MLflow run this run logs to, so a resumed run continues it."""
RUN_ID = "run_id"
"""The run's id in the runs registry (stoker.cluster.registry)."""
EXPORT = "export"
"""`stoker export`'s default output directory."""
EXPORT_WEIGHTS = "model.safetensors"
"""In an export: the float32 weights."""
EXPORT_MODEL = "model.json"
"""In an export: the model config, input spec, classes and the dataset's transform."""


class DatasetRecord(TypedDict):
    """dataset.json: what the run trained on, so a resume can refuse other data."""

    path: str
    source_fingerprint: str | None
    rows: dict[str, int]
    input_shape: list[int]
    num_classes: int | None
    target_scale: dict[str, Any] | None


class FinalMetrics(TypedDict, total=False):
    """final_metrics.json: the best epoch and its scores, written when a run ends."""

    run: str
    metric: str
    best_rule: str
    tie_break: str
    best_epoch: int
    checkpoint: str | None
    validation: dict[str, float]
    test: dict[str, float]
    test_details: dict[str, Any]
    epochs_trained: int
    stopped_early: bool
    source_fingerprint: str | None


class Resize(TypedDict):
    """A change of the number of workers between two consecutive epochs of a run."""

    epoch: int
    """The first epoch trained at the new size."""
    workers_from: int
    workers_to: int


class Preemption(TypedDict):
    """A node drain the run checkpointed for (stoker.trainer.preemption)."""

    epoch: int
    micro_step: int
    """The micro-step of `epoch` its just-in-time checkpoint was taken at."""
    nodes: list[str]
    """Ray node ids of the drained nodes."""


class Scaling(TypedDict):
    """The workers a run trains on now (its latest epoch's), the resizes that led there, and
    the node drains (preemptions) it went through."""

    workers: int
    resizes: list[Resize]
    preemptions: list[Preemption]


class Progress(TypedDict):
    """Where a run stands, from its records: what the listings show for a running run."""

    epoch: int
    """The last epoch recorded (0-based)."""
    epochs: int
    """The run's `train.epochs`."""
    samples_per_s: float | None
    """The last epoch's training rate."""
    eta_s: float | None
    """The epochs left times the mean wall time of the last (up to) five epochs, validation
    included; None before an epoch with a time."""


class DriverRecord(TypedDict):
    """driver.json: the process that drives the run."""

    host: str
    pid: int


def _json(path: Path) -> Any:
    """A JSON record's value; None if the file is absent or not JSON (a half-copied run)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Records:
    """The records of one run as stoker reads and writes them on local disk: in the run
    directory itself, or in an S3 run's staging copy (`RunDir.records`)."""

    directory: Path

    @property
    def metrics_path(self) -> Path:
        return self.directory / METRICS

    @property
    def events_path(self) -> Path:
        return self.directory / EVENTS

    @property
    def tensorboard(self) -> Path:
        return self.directory / TENSORBOARD

    @property
    def mlflow_db(self) -> Path:
        return self.directory / MLFLOW_DB

    @property
    def mlflow_run_id(self) -> Path:
        return self.directory / MLFLOW_RUN_ID

    @property
    def run_id(self) -> Path:
        return self.directory / RUN_ID

    @property
    def report(self) -> Path:
        return self.directory / REPORT

    @property
    def export(self) -> Path:
        return self.directory / EXPORT

    def exists(self) -> bool:
        """Whether this is a run directory: it holds the config a run wrote."""
        return (self.directory / CONFIG).is_file()

    def config(self) -> dict[str, Any] | None:
        """config.yaml as a plain dict (it may be from an older stoker: validate before use)."""
        import yaml

        try:
            return yaml.safe_load((self.directory / CONFIG).read_text()) or {}
        except FileNotFoundError:
            return None

    def config_path(self) -> Path:
        return self.directory / CONFIG

    def write_config(self, config: dict[str, Any]) -> None:
        import yaml

        write_text(self.directory / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def dataset(self) -> DatasetRecord | None:
        return _json(self.directory / DATASET)

    def write_dataset(self, record: DatasetRecord) -> None:
        write_json(self.directory / DATASET, record)

    def write_deepspeed(self, config: dict[str, Any]) -> None:
        write_json(self.directory / DEEPSPEED, config)

    def final(self) -> FinalMetrics | None:
        return _json(self.directory / FINAL)

    def write_final(self, record: FinalMetrics) -> None:
        write_json(self.directory / FINAL, record)

    def driver(self) -> DriverRecord | None:
        return _json(self.directory / DRIVER)

    def write_driver(self) -> None:
        """Name this process as the run's driver."""
        import socket

        write_json(self.directory / DRIVER, {"host": socket.gethostname(), "pid": os.getpid()}, indent=None)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's epochs, in the order they were logged."""
        path = self.metrics_path
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def scaling(self) -> Scaling | None:
        """The world size of the latest epoch and every resize before it (after a resume at
        another number of workers, an elastic resize or a lost node); None before an epoch
        with a recorded world size."""
        sizes = [(r["epoch"], r["world_size"]) for r in self.metrics() if "world_size" in r]
        if not sizes:
            return None
        resizes = [Resize(epoch=epoch, workers_from=before, workers_to=now)
                   for (_, before), (epoch, now) in zip(sizes, sizes[1:], strict=False) if now != before]
        preemptions = [Preemption(epoch=e["epoch"], micro_step=e["micro_step"], nodes=e["nodes"])
                       for e in self.events() if e.get("event") == "preempted"]
        return Scaling(workers=sizes[-1][1], resizes=resizes, preemptions=preemptions)

    def progress(self) -> Progress | None:
        """The run's epoch of `train.epochs`, samples/s and time left; None before its first
        epoch or without its config."""
        metrics, config = self.metrics(), self.config()
        epochs = ((config or {}).get("train") or {}).get("epochs")  # a record: always there when a run wrote it
        if not metrics or epochs is None:
            return None
        epochs = int(epochs)
        last = metrics[-1]
        times = [r["epoch_time_s"] + r.get("validation_s", 0.0) for r in metrics[-5:] if "epoch_time_s" in r]
        left = max(epochs - int(last["epoch"]) - 1, 0)
        return Progress(epoch=int(last["epoch"]), epochs=epochs, samples_per_s=last.get("samples_per_s"),
                        eta_s=left * sum(times) / len(times) if times else None)

    def events(self) -> list[dict[str, Any]]:
        """events.jsonl: worker failures and node drains, oldest first."""
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def drop_metrics(self, from_epoch: int) -> None:
        """Drop the epoch lines from `from_epoch` on: they run again after a restart or resume,
        and each epoch is listed once."""
        path = self.metrics_path
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < from_epoch]
        if len(kept) != len(lines):
            write_text(path, "".join(line + "\n" for line in kept))


def finished(final: FinalMetrics | None, epochs: int) -> bool:
    """Whether a run with these final metrics has nothing left to train for `epochs` epochs."""
    return bool(final) and bool(final.get("stopped_early") or final.get("epochs_trained", 0) >= epochs)


def staging_root(storage: str) -> Path:
    """The local directory that mirrors the records of the runs under an `s3://` storage."""
    base = os.environ.get(STAGING_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stoker" / "runs"
    return Path(base, *strip_scheme(storage).strip("/").split("/")).resolve()


def local_storage(storage: str) -> Path:
    """`storage` as a local directory: itself, or for `s3://` its staging root (where, e.g.,
    the default SQLite registry of those runs lives)."""
    return staging_root(storage) if is_s3(storage) else Path(storage)


_LOCAL_ONLY = EXPORT  # `stoker export`'s default output in the staging directory: never mirrored


_LEASE_FILES = (LEASE,)
"""The writer lease (stoker.trainer.run_lease) lives beside the records, never mirrored: on S3
it is written there directly, with conditional writes."""


def _is_record(relative: str) -> bool:
    first = relative.split("/", 1)[0]
    return not (first.startswith(_RAY_PREFIX) or first in (_RAY_MARKER, _LOCAL_ONLY, ".", "", *_LEASE_FILES))


@dataclass(frozen=True)
class RunDir:
    """One run's directory: `uri` where it lives, `local` where stoker writes its records."""

    uri: str
    """The run directory: an absolute local path, or `s3://bucket/prefix/<name>`."""
    local: Path
    """The run directory itself on local storage; its staging directory on S3."""
    s3: S3Config | None = None
    _pinned_fs: Any = field(default=None, compare=False, repr=False)
    """The S3 filesystem of `pinned()`: its credentials resolved once, when it was made."""

    @property
    def remote(self) -> bool:
        return is_s3(self.uri)

    def pinned(self) -> "RunDir":
        """This run directory with its S3 credentials resolved now and kept for later calls:
        for a thread that uploads while a search runs, when the driver's environment no longer
        holds them (stoker.ray_internals.no_credentials_in_trial_env)."""
        if not self.remote:
            return self
        return replace(self, _pinned_fs=filesystem(self.uri, self.s3, carry_credentials=True))

    @property
    def records(self) -> Records:
        """The records as stoker writes them: in the run directory, or in its staging copy."""
        return Records(self.local)

    def final(self) -> FinalMetrics | None:
        """final_metrics.json where the run lives (on S3, without pulling the other records)."""
        text = self.read_record(FINAL)
        try:
            return json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None

    def ray_storage(self) -> tuple[str, Any]:
        """`RunConfig(storage_path, storage_filesystem)` for Ray Train: the run's parent."""
        if not self.remote:
            return str(self.local.parent), None
        parent = posixpath.dirname(self._bare)
        return parent, ray_filesystem(self.uri, self.s3)

    # --- S3 only below; each is a no-op (or the local answer) on local storage ---

    def _fs(self):
        return self._pinned_fs or filesystem(self.uri, self.s3)

    @property
    def _bare(self) -> str:
        """The run's S3 prefix without the scheme, as s3fs names keys."""
        return strip_scheme(self.uri).rstrip("/")

    def check_bucket(self) -> None:
        """Refuse an S3 storage whose bucket does not exist (or cannot be reached), in one line
        naming `storage` and the bucket, before anything starts."""
        if not self.remote:
            return
        bucket = strip_scheme(self.uri).split("/", 1)[0]
        fs = self._fs()
        with storage_errors("storage", f"s3://{bucket}"):
            if fs.exists(bucket):  # one HEAD request
                return
            # exists() says False for refused credentials and unreachable endpoints too; a
            # listing raises what went wrong (storage_errors turns it into one line).
            try:
                fs.ls(bucket)
            except FileNotFoundError:
                raise UserError(f"storage: bucket {bucket!r} does not exist ({self.uri})") from None

    def pull_records(self) -> None:
        """Make the staging directory a copy of the run's records on S3 (empty for a new run):
        a resumed run, possibly started on another machine, continues its own records."""
        if not self.remote:
            return
        fs, bare = self._fs(), self._bare
        with storage_errors("storage", self.uri):
            found = fs.find(bare) if fs.exists(bare) else []
            records = {posixpath.relpath(name, bare): name for name in found if not name.endswith("/")}
            records = {relative: name for relative, name in records.items() if _is_record(relative)}
            self.local.mkdir(parents=True, exist_ok=True)
            # Local records the run on S3 does not have are stale (e.g. a run trained here,
            # since continued elsewhere); a local export stays.
            for path in [p for p in self.local.rglob("*") if p.is_file()]:
                relative = path.relative_to(self.local).as_posix()
                if _is_record(relative) and relative not in records:
                    path.unlink()
            for relative, name in records.items():
                target = self.local / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(name, str(target))

    def push_records(self, changed_since: float | None = None, prune: bool = False) -> None:
        """Upload every record in the staging directory to the run's prefix on S3.

        `changed_since` (a time): skip files not modified since then that S3 already has;
        `prune`: delete the records on S3 that the staging directory no longer has (files
        that Tune and Train deleted locally, e.g. checkpoints past their `keep`)."""
        if not self.remote or not self.local.is_dir():
            return
        fs, bare = self._fs(), self._bare
        with storage_errors("storage", self.uri):
            stored = set()
            if (changed_since is not None or prune) and fs.exists(bare):
                stored = {posixpath.relpath(name, bare) for name in fs.find(bare)}
            local = set()
            for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
                relative = path.relative_to(self.local).as_posix()
                if not _is_record(relative):
                    continue
                local.add(relative)
                # A second's margin: file times come from a coarser clock than time.time().
                if changed_since is not None and relative in stored and path.stat().st_mtime < changed_since - 1:
                    continue
                fs.put_file(str(path), posixpath.join(bare, relative))
            if prune:
                gone = [posixpath.join(bare, r) for r in sorted(stored - local) if _is_record(r)]
                if gone:
                    fs.rm(gone)

    def remove(self) -> None:
        """Delete the run (its checkpoints and records) and its staging directory (`--fresh`),
        keeping the lease of the driver that asked for it."""
        if self.remote:
            fs, bare = self._fs(), self._bare
            with storage_errors("storage", self.uri):
                if fs.exists(bare):
                    doomed = [name for name in fs.find(bare) if posixpath.relpath(name, bare) not in _LEASE_FILES]
                    if doomed:
                        fs.rm(doomed)
            shutil.rmtree(self.local, ignore_errors=True)
            return
        for path in self.local.iterdir() if self.local.is_dir() else []:
            if path.name in _LEASE_FILES:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def take_lease(self, run: str, say=None):
        """Become the run's one writer (stoker.trainer.run_lease): a `Lease` to release when
        the run ends; exit 2 naming the holder while another driver's lease is live."""
        from stoker.trainer.run_lease import acquire

        return acquire(self, run, say)

    def write_record(self, name: str, text: str) -> None:
        """Write one record in the staging directory (the run directory itself on local
        storage) and, on S3, upload it at once."""
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if self.remote:
            with storage_errors("storage", self.uri):
                self._fs().put_file(str(path), posixpath.join(self._bare, name))

    def read_record(self, name: str) -> str | None:
        """The text of one of the run's records (e.g. final_metrics.json), None if absent."""
        if not self.remote:
            path = self.local / name
            return path.read_text() if path.is_file() else None
        fs, path = self._fs(), posixpath.join(self._bare, name)
        with storage_errors("storage", self.uri):
            if not fs.exists(path):
                return None
            with fs.open(path, "r") as handle:
                return handle.read()

    def checkpoints(self, whole_epochs: bool = False) -> list[tuple[str, int]]:
        """(name, epoch) of the run's checkpoints, newest epoch first (read from each one's
        stoker state; on S3 only that small file is fetched). `whole_epochs`: without a node
        drain's mid-epoch checkpoints (stoker.trainer.checkpoints.is_partial)."""
        if not self.remote:
            from stoker.trainer import checkpoints as ckpt

            return [(p.name, ckpt.epoch_of(p)) for p in ckpt.local_checkpoints(self.local)
                    if not (whole_epochs and ckpt.is_partial(p))]
        fs, bare = self._fs(), self._bare
        found = []
        with storage_errors("storage", self.uri):
            if not fs.exists(bare):
                return []
            for entry in fs.ls(bare, detail=True):
                name = posixpath.basename(entry["name"].rstrip("/"))
                if entry["type"] != "directory" or not name.startswith(_RAY_PREFIX):
                    continue
                try:
                    with fs.open(posixpath.join(bare, name, _STATE_FILE), "r") as handle:
                        state = json.load(handle)
                    epoch = int(state["epoch"])
                except (FileNotFoundError, ValueError, KeyError):
                    epoch, state = -1, {}  # not a complete stoker checkpoint
                if not (whole_epochs and state.get("partial")):
                    found.append((name, epoch))
        return sorted(found, key=lambda item: (item[1], item[0]), reverse=True)

    def checkpoint_uri(self, name: str) -> str:
        return join(self.uri, name)

    def check_checkpoint(self, name: str) -> None:
        """Refuse (exit 2, one line) a checkpoint of a run on S3 whose pickles are unsafe to
        load, where it lies, before anything downloads it (stoker.trainer.checkpoint_guard)."""
        from stoker.trainer.checkpoint_guard import check_remote_checkpoint

        with storage_errors("storage", self.checkpoint_uri(name)):
            check_remote_checkpoint(self._fs(), posixpath.join(self._bare, name), self.checkpoint_uri(name))

    def download_checkpoint(self, name: str, into: Path) -> Path:
        """Copy one checkpoint directory of a run on S3 into `into/<name>`; returns that
        directory (a local run's checkpoints are read where they are)."""
        target = into / name
        fs, source = self._fs(), posixpath.join(self._bare, name)
        with storage_errors("storage", self.checkpoint_uri(name)):
            for path in fs.find(source):
                local = target / posixpath.relpath(path, source)
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(path, str(local))
        return target


def locate(storage: str, name: str, s3: S3Config | None = None) -> RunDir:
    """The run `name` under `storage` (a directory, or an `s3://` prefix)."""
    if "://" in storage and not is_s3(storage):
        # Path("gs://b/runs") would be a local directory `gs:/b/runs`: refused, not written.
        raise UserError(f"storage: {storage}: only a directory or an s3:// URI can hold runs")
    if is_s3(storage):
        uri = join(storage.rstrip("/"), name)
        return RunDir(uri, staging_root(storage) / name, s3)
    local = (Path(storage) / name).resolve()
    return RunDir(str(local), local, s3)


def at(uri: str, s3: S3Config | None = None) -> RunDir:
    """The run whose directory is `uri` (a local path or `s3://bucket/prefix/<name>`)."""
    if is_s3(uri):
        parent, _, name = uri.rstrip("/").rpartition("/")
        return locate(parent, name, s3)
    local = Path(uri).resolve()
    return RunDir(str(local), local, s3)


def find_on_s3(ref: str, storage: str, s3: S3Config | None = None) -> RunDir | None:
    """The run `ref` names when it lives on S3 (`ref` an `s3://` run directory, or a run name
    under an `s3://` `storage`), else None. Without `s3` options, the endpoint and region are
    those this machine's staging copy of the run recorded (a run trained here), else the AWS
    chain's."""
    if is_s3(ref):
        run = at(ref, s3)
    elif is_s3(storage) and "/" not in ref:
        run = locate(storage, ref, s3)
    else:
        return None
    staged = run.records.config()
    if s3 is None and staged is not None:
        from stoker.datasets.storage import s3_options

        run = RunDir(run.uri, run.local, s3_options(staged))
    return run


EXPORT_RECORDS = (CONFIG, DATASET, FINAL)
"""What `stoker export` (and `stoker monitor`) read from a run directory besides a checkpoint."""


@contextmanager
def fetched_for_export(run: RunDir, which: str) -> Iterator[Path]:
    """For a run on S3: a temporary local run directory holding the run's records and only the
    checkpoint that `which` ("best" or "latest") names, for
    `stoker.trainer.export.export_run`; removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="stoker-export-"))
    try:
        local = scratch / run.uri.rstrip("/").rsplit("/", 1)[-1]
        local.mkdir()
        records = RunDir(run.uri, local, run.s3)
        for name in EXPORT_RECORDS:
            text = records.read_record(name)
            if text is not None:
                (local / name).write_text(text)
        if not Records(local).exists():
            raise UserError(f"{run.uri}: no run directory there (no config.yaml)")
        found = records.checkpoints()
        best = None
        if which == "best" and found:
            final = Records(local).final()
            best = final["best_epoch"] if final else _best_named_by(records, found[0][0])
        name = pick_checkpoint(found, which, best, run.uri)
        records.download_checkpoint(name, local)
        yield local
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _best_named_by(run: RunDir, checkpoint: str) -> int | None:
    """The best epoch a checkpoint's state names (a run still training, or stopped)."""
    state = run.read_record(posixpath.join(checkpoint, _STATE_FILE))
    return (json.loads(state).get("best") or {}).get("epoch") if state else None
