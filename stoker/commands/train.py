"""`stoker train CONFIG`: train on the embedded local Ray cluster."""

import argparse
import contextlib
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from stoker.config import RunConfig, load_config
from stoker.datasets.manifest import Manifest
from stoker.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a model with DeepSpeed on Ray Train workers")
    parser.add_argument("config")
    parser.add_argument("--name", help="override the config's run name")
    parser.add_argument(
        "--fresh", action="store_true",
        help="delete an existing run directory of the same name instead of resuming it",
    )
    parser.add_argument("--verbose", action="store_true", help="show Ray's worker logs")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    run = load_config(args.config)
    if args.name:
        run = run.model_copy(update={"name": args.name})
    # Validate the dataset before paying for a cluster start.
    Manifest.read(run.data.output, run.data.s3)
    from stoker.trainer.run_dir import locate  # fsspec: not for every CLI start

    # `s3://` storage: Ray Train keeps the checkpoints on S3, stoker's records are staged in
    # `run_dir` and uploaded (stoker.trainer.run_dir); an unknown bucket is refused here.
    storage = locate(run.storage, run.name, run.data.s3)
    storage.check_bucket()
    # One writer per run: a second driver of this run is refused here, before it changes
    # anything; a dead driver's lease is taken over and the run resumes.
    lease = storage.take_lease(run.name, say=lambda line: print(f"stoker: {line}", file=sys.stderr, flush=True))
    try:
        return _train_leased(args, run, storage)
    finally:
        lease.release()


def _train_leased(args: argparse.Namespace, run: RunConfig, storage) -> int:
    from stoker.trainer import run_dir as run_dir_module

    run_dir = storage.local
    if args.fresh:
        storage.remove()
    finished = storage.final()
    if run_dir_module.finished(finished, run.train.epochs):
        # Nothing left to train: say so without starting Ray (it would only resume and stop).
        print(f"run {run.name} already finished: {finished['epochs_trained']} epochs"
              f"{' (stopped early)' if finished.get('stopped_early') else ''}, best epoch {finished['best_epoch']} "
              f"(by {finished['metric']}); test metrics: "
              + ", ".join(f"{k} {v:.4f}" for k, v in finished["test"].items())
              + f"\nrun directory: {storage.uri} (--fresh trains it again; more train.epochs continues it)")
        return 0

    from ray.train import TrainingFailedError

    from stoker.cluster.connect import connect_embedded
    from stoker.cluster.registry import record_run, registry_for_run
    from stoker.trainer.models import describe_model
    from stoker.trainer.run import train

    registry = registry_for_run(run)  # a registry that cannot be opened fails before the cluster starts
    try:
        _reconcile_dead_drivers(registry)
    finally:
        registry.close()
    started: list[str] = []
    # The registry records where the run lives (its s3:// URI on S3), read from `run_dir`.
    where = {"uri": storage.uri} if storage.remote else {}

    def on_start(directory: Path) -> None:
        storage.records.write_driver()
        started.append(record_run(directory, "running", run=run, **where))

    out = sys.stdout
    previous = None
    try:
        # stdout carries stoker's own lines: whatever Ray (its raylet warnings, printed by the
        # driver), DeepSpeed or a library prints meanwhile goes to stderr, without colour codes
        # unless that is a terminal.
        with contextlib.redirect_stdout(_Plain(sys.stderr)):
            connect_embedded(log_to_driver=args.verbose)
            # After ray.init, which installs Ray's own SIGTERM handler (it ends the process at
            # once, with no checkpoint and no record of the stop).
            previous = _stop_on_sigterm()
            print(f"training {run.name}: {describe_model(run.model, run.data)}, {run.scaling.num_workers} workers, DeepSpeed ZeRO "
                  f"{run.train.deepspeed.zero_stage}, {run.train.epochs} epochs", file=out, flush=True)
            result = train(run, progress=lambda record: _print_epoch(record, out), on_start=on_start)
    except UserError as exc:
        # Refused before training (scaling, batch size, metric, ...) leaves no record; a user
        # error during training (a NaN loss) fails the recorded run.
        if started:
            record_run(run_dir, "failed", run=run, error=str(exc), **where)
        raise
    except TrainingFailedError as exc:
        record_run(run_dir, "failed", run=run, error=_root_cause(exc), **where)
        raise RuntimeError(f"training failed: {_root_cause(exc)}") from exc
    except KeyboardInterrupt:
        return _stopped(run, storage, args, bool(started))
    except BaseException as exc:
        if started:
            record_run(run_dir, "failed", run=run, error=_root_cause(exc), **where)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    record_run(result.run_dir, "succeeded", run=run, **where)
    print(f"\nrun {run.name}: best epoch {result.best_epoch} (by val_{result.metric}; on an equal value the lower "
          "val_loss wins)")
    print("test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in result.test.items()))
    print(f"run directory: {result.location or result.run_dir}")
    return 0


def _stop_on_sigterm():
    """SIGTERM (a scheduler or `kill`) stops the run as Ctrl-C does; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _stopped(run: RunConfig, storage, args: argparse.Namespace, started: bool) -> int:
    """Ctrl-C or SIGTERM: stop the workers, record the run as stopped, say how to resume."""
    import ray

    from stoker.cluster.registry import record_run

    # Ends the embedded cluster (and with it the workers) now; on a cluster we joined, the
    # run's actors belong to this driver and go with it.
    ray.shutdown()
    if started:
        record_run(storage.local, "stopped", run=run, error="interrupted (Ctrl-C or SIGTERM)",
                   **({"uri": storage.uri} if storage.remote else {}))
    found = storage.checkpoints() if storage.remote or storage.local.exists() else []
    where = f"from its checkpoint of epoch {found[0][1]}" if found else "from the start (no checkpoint yet)"
    events = storage.records.events() if storage.local.exists() else []
    if found and events and events[-1]["event"] == "stopped" and events[-1]["epoch"] == found[0][1] + 1:
        # The workers checkpointed where they were (stoker.trainer.stop_flag): mid-epoch.
        where = f"at epoch {events[-1]['epoch']}, step {events[-1]['micro_step']} of {events[-1]['steps_in_epoch']}"
    command = f"stoker train {args.config}" + (f" --name {args.name}" if args.name else "")
    print(f"stoker: interrupted: run {run.name} stopped; `{command}` resumes it {where}", file=sys.stderr, flush=True)
    return 130


def _reconcile_dead_drivers(registry) -> None:
    """Runs recorded as `running` whose driver was a process of this host that is gone (killed,
    machine rebooted) are marked failed, so `stoker runs list` does not show them running for
    ever. Runs driven from elsewhere (submitted jobs) are left to their own host."""
    from stoker.trainer.run_dir import Records, at
    from stoker.trainer.run_lease import alive

    host = socket.gethostname()
    for record in registry.runs(status="running"):
        # A run on S3 keeps driver.json in its local staging copy (stoker.trainer.run_dir).
        run_dir = at(record.run_dir).local if (record.run_dir or "").startswith("s3://") else Path(record.run_dir or "")
        driver = Records(run_dir).driver()
        if driver is None or driver.get("host") != host or alive(int(driver.get("pid", 0))):
            continue
        registry.upsert_run(record.id, status="failed",
                            error=f"its driver (pid {driver['pid']} on {host}) ended without recording an outcome")


def _print_epoch(record: dict[str, Any], out=None) -> None:
    scores = "  ".join(
        f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float)
    )
    print(f"epoch {record['epoch']:>3}  train_loss {record['train_loss']:.4f}  {scores}  "
          f"({record['epoch_time_s']:.1f}s, {record['samples_per_s']:.0f} samples/s)", file=out or sys.stdout, flush=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Plain:
    """A text stream that forwards to `target`, dropping ANSI colour codes unless `target` is a
    terminal (Ray colours its raylet lines even when they are redirected)."""

    def __init__(self, target) -> None:
        self.target = target
        self.tty = bool(getattr(target, "isatty", lambda: False)())

    def write(self, text: str) -> int:
        self.target.write(text if self.tty else _ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.tty

    def __getattr__(self, name: str):
        return getattr(self.target, name)


def _root_cause(exc: BaseException) -> str:
    # Ray wraps the worker's exception; its last line is the one that says what went wrong.
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
