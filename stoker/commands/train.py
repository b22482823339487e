"""`stoker train CONFIG`: train on the embedded local Ray cluster."""

import argparse
import contextlib
import re
import sys
from typing import TYPE_CHECKING, Any

from stoker.config import load_config
from stoker.datasets.manifest import Manifest
from stoker.errors import UserError

if TYPE_CHECKING:  # the CLI starts without SQLAlchemy: the module is imported when a run starts
    from stoker.cluster.run_life import RunLife


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
    from stoker.cluster.run_life import RunLife
    from stoker.trainer.run_dir import locate  # fsspec: not for every CLI start

    # `s3://` storage: Ray Train keeps the checkpoints on S3, stoker's records are staged in
    # `run_dir` and uploaded (stoker.trainer.run_dir); an unknown bucket is refused here.
    storage = locate(run.storage, run.name, run.data.s3)
    storage.check_bucket()
    # One writer per run: a second driver of this run is refused here, before it changes
    # anything; a dead driver's lease is taken over and the run resumes.
    with RunLife.leased(run, storage) as life:
        return _train_leased(args, life)


def _train_leased(args: argparse.Namespace, life: "RunLife") -> int:
    from stoker.trainer import run_dir as run_dir_module

    run, storage = life.run, life.storage
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
    from stoker.cluster.run_life import root_cause, sigterm_as_interrupt
    from stoker.trainer.models import describe_model
    from stoker.trainer.run import train

    life.settle_dead_drivers()  # a registry that cannot be opened fails before the cluster starts
    out = sys.stdout
    try:
        # stdout carries stoker's own lines: whatever Ray (its raylet warnings, printed by the
        # driver), DeepSpeed or a library prints meanwhile goes to stderr, without colour codes
        # unless that is a terminal.
        with contextlib.redirect_stdout(_Plain(sys.stderr)):
            connect_embedded(log_to_driver=args.verbose)
            with sigterm_as_interrupt():
                print(f"training {run.name}: {describe_model(run.model, run.data)}, {run.scaling.num_workers} workers, "
                      f"DeepSpeed ZeRO {run.train.deepspeed.zero_stage}, {run.train.epochs} epochs", file=out, flush=True)
                result = train(run, progress=lambda record: _print_epoch(record, out), on_start=life.start)
    except UserError as exc:
        # Refused before training (scaling, batch size, metric, ...) leaves no record; a user
        # error during training (a NaN loss) fails the recorded run.
        life.end("failed", error=str(exc))
        raise
    except TrainingFailedError as exc:
        life.end("failed", error=root_cause(exc))
        raise RuntimeError(f"training failed: {root_cause(exc)}") from exc
    except KeyboardInterrupt:
        return _stopped(args, life)
    except BaseException as exc:
        life.end("failed", error=root_cause(exc))
        raise
    life.end("succeeded", directory=result.run_dir)
    print(f"\nrun {run.name}: best epoch {result.best_epoch} (by val_{result.metric}; on an equal value the lower "
          "val_loss wins)")
    print("test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in result.test.items()))
    print(f"run directory: {result.location or result.run_dir}")
    return 0


def _stopped(args: argparse.Namespace, life: "RunLife") -> int:
    """Ctrl-C or SIGTERM: stop the workers, record the run as stopped, say how to resume."""
    import ray

    # Ends the embedded cluster (and with it the workers) now; on a cluster we joined, the
    # run's actors belong to this driver and go with it.
    ray.shutdown()
    life.end("stopped", error="interrupted (Ctrl-C or SIGTERM)")
    command = f"stoker train {args.config}" + (f" --name {args.name}" if args.name else "")
    print(life.resume_hint(command), file=sys.stderr, flush=True)
    return 130


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
