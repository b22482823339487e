"""Where a search's experiment directory lives: `<storage>/<experiment name>`, a local (or
shared) directory, or under an `s3://` prefix.

On S3 the experiment runs in a local staging copy (`stoker.trainer.run_storage.staging_root`):
Tune's state, every trial's Train run and the results are written there as on local storage,
and the copy is mirrored to `s3://bucket/prefix/<experiment name>/`: downloaded before the search
when S3 holds a newer push than this machine (a search continued on another machine), uploaded
when the search ends, however it ends, and after `--pick`. Tune's pointer checkpoints, PBT's
copies of a donor's checkpoint and a resume all read ordinary local files that way.

The staging copy is on the driver's node. Trials on other nodes of a multi-node cluster write
their runs to the same path on their own node, so there the staging root
(`$STOKER_STAGING_DIR`) must be shared storage, as a local `storage` must be.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager

from stoker.trainer.run_storage import STAGING_ENV, RunStorage, locate
from stoker.tune.schema import SearchRun

SYNC_FILE = ".stoker_pushed"
"""When the staging copy was last uploaded (a Unix time), in the copy and on S3."""


def experiment_name(run: SearchRun) -> str:
    return run.tune.name or f"{run.name}-tune"


def experiment_storage(run: SearchRun) -> RunStorage:
    """The experiment directory: `uri` where it lives, `local` where the search writes it."""
    return locate(run.storage, experiment_name(run), run.data.s3)


def staging_notice(storage: RunStorage, nodes: int) -> str | None:
    """A warning for a search on S3 storage over several nodes (see the module docstring)."""
    if not storage.remote or nodes < 2:
        return None
    return (f"storage {storage.uri}: the search is staged at {storage.local} and uploaded when it ends; "
            f"trials on the other {nodes - 1} node(s) write there too, so {STAGING_ENV} must be shared storage")


def _stamp(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0


@contextmanager
def mirrored(storage: RunStorage, fresh: bool = False) -> Iterator[None]:
    """The experiment's staging copy up to date with S3 while the block runs, uploaded after
    it (a no-op for local storage). `fresh` deletes the experiment on S3 and here first."""
    if not storage.remote:
        yield
        return
    storage.check_bucket()
    stamp = storage.local / SYNC_FILE
    last = _stamp(stamp.read_text()) if stamp.is_file() else None
    if fresh:
        storage.remove()
        last = None
    elif (remote := _stamp(storage.read_record(SYNC_FILE))) > (last or 0.0):
        # A local copy at least as new as S3's (the same machine's last push, or a search
        # killed here before it could push) is kept: pulling would throw away its progress.
        storage.pull_records()
        last = remote
    try:
        yield
    finally:
        started = time.time()
        storage.push_records(changed_since=last, prune=True)
        # Stamped after the upload: a push cut short leaves the older stamp, so the next one
        # uploads everything changed since that.
        storage.write_record(SYNC_FILE, repr(started))
