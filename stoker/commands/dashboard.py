"""`stoker dashboard [PATH]`: a live view of the searches and runs under a storage directory
(`stoker.cluster.dashboard`), on 127.0.0.1 unless `--host` says otherwise."""

import argparse
import errno
import os
import sys
from pathlib import Path

from stoker.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("dashboard", help="serve a live view of the searches and runs under a storage path")
    parser.add_argument("path", nargs="?", default="runs",
                        help="storage directory, or an s3:// storage (its local staging copy, where this "
                             "machine's searches and runs write as they go) (default: runs)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves everyone who "
                             "can reach this machine, with no login)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    parser.add_argument("--no-tensorboard", action="store_true",
                        help="leave out the runs' TensorBoard (its reload scans every event file under PATH)")
    parser.set_defaults(handler=_dashboard)


def storage_root(path: str) -> Path:
    """The local directory to watch: `path` itself, or an `s3://` storage's staging copy."""
    from stoker.datasets.storage import is_s3
    from stoker.trainer.run_dir import local_storage

    root = local_storage(path)
    where = f"{path} (staging copy {root})" if is_s3(path) else str(root)
    if not root.is_dir():
        raise UserError(f"{where}: no such storage directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"{where}: cannot read the storage directory (permission denied)")
    return root


def _dashboard(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port: {args.port} is not a port (1-65535)")
    root = storage_root(args.path)
    from stoker.cluster.dashboard import find, serve

    searches, runs = find(root)
    if not searches and not runs:
        raise UserError(f"{args.path}: no runs or searches here (a run directory holds config.yaml, "
                        "a search's experiment directory stoker_experiment.json)")
    print(f"stoker dashboard: {len(searches)} searches and {len(runs)} runs under {root}; "
          f"http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        serve(root, args.host, args.port, with_tensorboard=not args.no_tensorboard)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise UserError(f"--port: port {args.port} on {args.host} is in use; pick another with --port") from None
        raise
    except KeyboardInterrupt:
        pass
    return 0
