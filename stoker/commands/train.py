"""`stoker train CONFIG`: train on the embedded local Ray cluster."""

import argparse
import shutil
from pathlib import Path
from typing import Any

from stoker.config import load_config
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
    from ray.train import TrainingFailedError

    from stoker.cluster.connect import connect_embedded
    from stoker.cluster.registry import record_run, registry_for_run
    from stoker.trainer.run import train

    run = load_config(args.config)
    if args.name:
        run = run.model_copy(update={"name": args.name})
    # Validate the dataset before paying for a cluster start.
    Manifest.read(run.data.output, run.data.s3)
    run_dir = Path(run.storage) / run.name
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    started: list[str] = []
    registry_for_run(run).close()  # a registry that cannot be opened fails before the cluster starts
    connect_embedded(log_to_driver=args.verbose)
    print(f"training {run.name}: {run.scaling.num_workers} workers, DeepSpeed ZeRO {run.train.deepspeed.zero_stage}, "
          f"{run.train.epochs} epochs")
    try:
        result = train(run, progress=_print_epoch, on_start=lambda d: started.append(record_run(d, "running", run=run)))
    except UserError as exc:
        # Refused before training (scaling, batch size, metric, ...) leaves no record; a user
        # error during training (a NaN loss) fails the recorded run.
        if started:
            record_run(run_dir, "failed", run=run, error=str(exc))
        raise
    except TrainingFailedError as exc:
        record_run(run_dir, "failed", run=run, error=_root_cause(exc))
        raise RuntimeError(f"training failed: {_root_cause(exc)}") from exc
    except BaseException as exc:
        record_run(run_dir, "stopped" if isinstance(exc, KeyboardInterrupt) else "failed", run=run, error=_root_cause(exc))
        raise
    record_run(result.run_dir, "succeeded", run=run)
    print(f"\nrun {run.name}: best epoch {result.best_epoch} (by val_{result.metric})")
    print("test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in result.test.items()))
    print(f"run directory: {result.run_dir}")
    return 0


def _print_epoch(record: dict[str, Any]) -> None:
    scores = "  ".join(
        f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float)
    )
    print(f"epoch {record['epoch']:>3}  train_loss {record['train_loss']:.4f}  {scores}  "
          f"({record['epoch_time_s']:.1f}s, {record['samples_per_s']:.0f} samples/s)", flush=True)


def _root_cause(exc: BaseException) -> str:
    # Ray wraps the worker's exception; its last line is the one that says what went wrong.
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
