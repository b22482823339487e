"""Where a search's experiment directory lives: `<storage>/<experiment name>`, a local (or
shared) directory, or under an `s3://` prefix.

On S3 the experiment runs in a local staging copy (`stoker.trainer.run_dir.staging_root`):
Tune's state, every trial's Train run and the results are written there as on local storage,
and the copy is mirrored to `s3://bucket/prefix/<experiment name>/`: downloaded before the search
when S3 holds a newer push than this machine (a search continued on another machine), uploaded
when the search ends, however it ends, and after `--pick`, and every `PUSH_EVERY_S` while it runs,
so a driver lost mid-search (its machine gone) leaves S3 at most that far behind. Tune's pointer
checkpoints, PBT's copies of a donor's checkpoint and a resume all read ordinary local files
that way.

The staging copy is on the driver's node. Trials on other nodes of a multi-node cluster write
their runs to the same path on their own node, so there the staging root
(`$STOKER_STAGING_DIR`) must be shared storage, as a local `storage` must be.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from stoker.trainer.run_dir import STAGING_ENV, RunDir, locate
from stoker.tune.schema import SearchRun

SYNC_FILE = ".stoker_pushed"
"""When the staging copy was last uploaded (a Unix time), in the copy and on S3."""

PUSH_EVERY_S = 300.0
"""How often a running search's staging copy is uploaded (the changed files only)."""

log = logging.getLogger(__name__)


def experiment_name(run: SearchRun) -> str:
    return run.tune.name or f"{run.name}-tune"


def experiment_storage(run: SearchRun) -> RunDir:
    """The experiment directory: `uri` where it lives, `local` where the search writes it."""
    return locate(run.storage, experiment_name(run), run.data.s3)


def staging_notice(storage: RunDir, nodes: int) -> str | None:
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
def mirrored(storage: RunDir, fresh: bool = False, push_every_s: float = PUSH_EVERY_S) -> Iterator[None]:
    """The experiment's staging copy up to date with S3 while the block runs, uploaded every
    `push_every_s` during it and after it (a no-op for local storage). `fresh` deletes the
    experiment on S3 and here first."""
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
    # The pushes run while the search's trials start, when this process's environment holds no
    # AWS credentials (no_credentials_in_trial_env): they use ones resolved here, before that.
    storage = storage.pinned()
    pusher = _Pusher(storage, last, push_every_s)
    pusher.start()
    try:
        yield
    finally:
        pusher.stop()
        _push(storage, pusher.since, prune=True)


def _push(storage: RunDir, since: float | None, prune: bool) -> float:
    """Upload what changed since `since`; returns the time the push started."""
    started = time.time()
    storage.push_records(changed_since=since, prune=prune)
    # Stamped after the upload: a push cut short leaves the older stamp, so the next one
    # uploads everything changed since that.
    storage.write_record(SYNC_FILE, repr(started))
    return started


class _Pusher(threading.Thread):
    """Uploads the staging copy every `every_s` while a search runs. It does not prune (Tune
    may be between deleting an old checkpoint and writing the new one); the final push does."""

    def __init__(self, storage: RunDir, since: float | None, every_s: float) -> None:
        super().__init__(name="stoker-experiment-push", daemon=True)
        self.storage, self.since, self.every_s = storage, since, every_s
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.every_s):
            try:
                self.since = _push(self.storage, self.since, prune=False)
            except Exception as exc:  # a file Tune replaced mid-upload: the next push catches up
                log.warning("uploading the experiment to %s: %s (retried at the next push)", self.storage.uri, exc)

    def stop(self) -> None:
        self._stopping.set()
        self.join()
