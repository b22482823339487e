"""`stoker models register|list|stage`: versioned models from recorded runs."""

import argparse

from stoker.cluster.registry import STAGES
from stoker.commands.runs import add_registry_options, open_registry
from stoker.commands.tables import print_records


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="register runs as versioned models and move them between stages")
    verbs = parser.add_subparsers(dest="models_command", metavar="VERB")
    verbs.required = True

    reg = verbs.add_parser("register", help="register a succeeded run as the next version of a model")
    reg.add_argument("run", help="run id, id prefix or name")
    reg.add_argument("--name", required=True, help="model name")
    reg.add_argument("--stage", choices=STAGES, default="none")
    reg.add_argument("--new-version", action="store_true",
                     help="register the run again as a new version even if it is already a version of this model")
    add_registry_options(reg)
    reg.set_defaults(handler=_register)

    listing = verbs.add_parser("list", help="model versions")
    listing.add_argument("name", nargs="?")
    listing.add_argument("--json", action="store_true")
    add_registry_options(listing)
    listing.set_defaults(handler=_list)

    stage = verbs.add_parser("stage", help="move a version to a stage (promoting archives the previous holder)")
    stage.add_argument("name")
    stage.add_argument("version", type=int)
    stage.add_argument("stage", choices=STAGES)
    add_registry_options(stage)
    stage.set_defaults(handler=_stage)


def _register(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    existing = None if args.new_version else registry.registered_version(args.run, args.name)
    if existing is not None:
        print(f"run {existing.run_id} is already {existing.name} version {existing.version} (stage {existing.stage}); "
              "pass --new-version to register it again"
              + (f", or move it with: stoker models stage {existing.name} {existing.version} {args.stage}"
                 if args.stage not in ("none", existing.stage) else ""))
        return 0
    run = registry.find_run(args.run)
    epoch = _checkpoint_epoch(run)
    version = registry.register_model(args.run, args.name, args.stage, new_version=args.new_version)
    print(f"registered {version.name} version {version.version} (stage {version.stage}) from run {version.run_id}, "
          f"epoch {epoch} (the best by {run.metric}): {version.checkpoint}")
    return 0


def _checkpoint_epoch(run) -> int | None:
    """The epoch of the checkpoint the registry will take for `run`; refuses one that is not
    the run's best epoch (its best checkpoint is never deleted by the run, so the storage
    was edited by hand)."""
    from pathlib import Path

    from stoker.errors import UserError
    from stoker.trainer import checkpoints as ckpt

    if run.status == "succeeded" and run.checkpoint and run.checkpoint.startswith("s3://"):
        epoch = _epoch_on_s3(run)
    elif run.status != "succeeded" or not run.checkpoint or not Path(run.checkpoint).is_dir():
        return run.best_epoch  # register_model refuses it with its own message
    else:
        epoch = ckpt.epoch_of(Path(run.checkpoint))
    if run.best_epoch is not None and epoch != run.best_epoch:
        raise UserError(
            f"run {run.id} ({run.name}): the best epoch's checkpoint (epoch {run.best_epoch}) is gone "
            f"(storage edited by hand?); the registry would take epoch {epoch} ({run.checkpoint})"
        )
    return epoch


def _epoch_on_s3(run) -> int:
    """The epoch in the stoker state of a checkpoint on S3 (read with the run's data.s3 options)."""
    import json

    from stoker.datasets.storage import join, open_uri, s3_options
    from stoker.trainer.checkpoints import STATE_FILE

    with open_uri(join(run.checkpoint, STATE_FILE), s3_options(run.config), "r", key="checkpoint") as handle:
        return int(json.load(handle)["epoch"])


def _list(args: argparse.Namespace) -> int:
    versions = open_registry(args, announce=True).models(args.name)
    records = [{
        "name": v.name, "version": v.version, "stage": v.stage, "run_id": v.run_id,
        "checkpoint": v.checkpoint, "created_at": v.created_at.isoformat(timespec="seconds"),
    } for v in versions]
    columns = [(key.upper().removesuffix("_ID"), lambda r, key=key: r[key])
               for key in ("name", "version", "stage", "run_id", "checkpoint")]
    print_records(records, columns, args.json)
    return 0


def _stage(args: argparse.Namespace) -> int:
    version = open_registry(args).set_stage(args.name, args.version, args.stage)
    print(f"{version.name} version {version.version}: stage {version.stage}")
    return 0
