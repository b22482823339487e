"""One writer per run: the lease a driver holds in its run directory while it trains.

`lease.json` names the holder (host, pid, attempt, the Ray job's submission id where there is
one), when it took the lease and its last heartbeat. A second driver of the same run finds a
live lease and is refused; a lease whose heartbeat stopped (a killed driver, a lost node) is
taken over, and the run resumes as any resumed run does.

Taking and renewing are compare-and-swap, never read-then-write: on local (or shared POSIX)
storage under an exclusive `flock` of a lock file beside the lease; on S3 with conditional
writes (`If-None-Match: *` to create, `If-Match: <ETag>` to replace), so two drivers that race
for a stale lease cannot both win.
"""

import errno
import fcntl
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stoker.errors import UserError

LEASE = "lease.json"
"""The lease's file name in a run directory (local) or under the run's prefix (S3)."""
HEARTBEAT_S = 10.0
"""How often the holder renews its heartbeat."""
STALE_AFTER_S = 60.0
"""A lease whose heartbeat is older than this is stale (its holder is gone) and may be taken
over. A holder on this host whose process is gone is stale at once."""
SUBMISSION_ENV = "STOKER_SUBMISSION_ID"
"""Set by `stoker submit` in a job's environment (stoker.cluster.registry names it too)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run's lease."""

    host: str
    pid: int
    token: str
    """Unique per acquisition: a holder recognises its own lease by it."""
    since: str
    """When the lease was taken (UTC, ISO 8601)."""
    heartbeat: float
    """The holder's last heartbeat (seconds since the epoch)."""
    attempt: int = 1
    """1 for a run's first driver; one more for each driver that took over a stale lease."""
    submission_id: str | None = None
    """The Ray job's submission id, for a submitted run."""

    def describe(self) -> str:
        job = f", Ray job {self.submission_id}" if self.submission_id else ""
        return f"pid {self.pid} on {self.host} (attempt {self.attempt}{job}) since {self.since}"


class _Store:
    """Where a lease document lives, with the two conditional writes the lease needs."""

    where: str

    def read(self) -> tuple[str, Any] | None:
        """(text, version) of the lease, None if there is none."""
        raise NotImplementedError

    def create(self, text: str) -> Any | None:
        """Write the lease if there is none: its new version, None if one exists."""
        raise NotImplementedError

    def replace(self, text: str, version: Any) -> Any | None:
        """Write the lease if it is still at `version`: its new version, None if it changed."""
        raise NotImplementedError

    def delete(self, version: Any) -> None:
        """Remove the lease if it is still at `version`."""
        raise NotImplementedError


class _LocalStore(_Store):
    """A lease file on a local or shared POSIX filesystem. Every read and change holds an
    exclusive flock of the lease file itself; the version is its content. An empty file (a
    driver that died between creating and writing it) is no lease."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LEASE
        self.where = str(self.path)

    @contextmanager
    def _locked(self, create: bool = False) -> Iterator[int | None]:
        """The lease file's descriptor, locked; None if there is no file (and not `create`)."""
        while True:
            try:
                if create:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            except FileNotFoundError:
                if create:
                    continue  # the directory went away (a released run's): make it again
                yield None
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                # Locked a file that a releasing driver unlinked meanwhile: open the new one.
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield fd
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _text(fd: int | None) -> str | None:
        if fd is None:
            return None
        text = os.pread(fd, 1 << 16, 0).decode()
        return text or None

    @staticmethod
    def _write(fd: int, text: str) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)

    def read(self) -> tuple[str, Any] | None:
        with self._locked() as fd:
            text = self._text(fd)
        return None if text is None else (text, text)

    def create(self, text: str) -> Any | None:
        with self._locked(create=True) as fd:
            if self._text(fd) is not None:
                return None
            self._write(fd, text)
            return text

    def replace(self, text: str, version: Any) -> Any | None:
        with self._locked() as fd:
            if fd is None or self._text(fd) != version:
                return None
            self._write(fd, text)
            return text

    def delete(self, version: Any) -> None:
        with self._locked() as fd:
            if fd is not None and self._text(fd) == version:
                self.path.unlink()  # while locked: a waiter sees the inode change and retries
        try:
            self.path.parent.rmdir()  # a run refused before it wrote anything leaves no trace
        except OSError:
            pass  # not empty: the run's records and checkpoints


class _S3Store(_Store):
    """A lease object on S3, changed only by conditional PUTs; the version is its ETag."""

    def __init__(self, fs, key: str, uri: str) -> None:
        self.fs, self.key, self.where = fs, key, uri

    def read(self) -> tuple[str, Any] | None:
        try:
            etag = self.fs.info(self.key)["ETag"]
            # An ETag read before the body: if the object changed in between, the next
            # conditional write carries the older ETag and fails, as it should.
            return self.fs.cat_file(self.key).decode(), etag
        except FileNotFoundError:
            return None

    def _conditional(self, text: str, **condition: Any) -> Any | None:
        """The new ETag (PutObject's response has it), None if the condition failed."""
        try:
            return self.fs.pipe_file(self.key, text.encode(), **condition)["ETag"]
        except FileExistsError:
            return None
        except OSError as exc:  # 412 Precondition Failed (s3fs maps it to EINVAL)
            if exc.errno == errno.EINVAL or "Precondition" in str(exc):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.key)

    def create(self, text: str) -> Any | None:
        return self._conditional(text, mode="create")

    def replace(self, text: str, version: Any) -> Any | None:
        return self._conditional(text, IfMatch=version)

    def delete(self, version: Any) -> None:
        found = self.read()
        if found is not None and found[1] == version:
            self.fs.rm_file(self.key)


def _parse(text: str, where: str, run: str) -> Holder:
    try:
        value = json.loads(text)
        return Holder(**{k: value[k] for k in ("host", "pid", "token", "since", "heartbeat")},
                      attempt=int(value.get("attempt", 1)), submission_id=value.get("submission_id"))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(
            f"{where}: not a stoker lease ({type(exc).__name__}: {exc}); if no stoker process is training "
            f"run {run}, delete it (rm {where}) and start the run again"
        ) from None


def alive(pid: int) -> bool:
    """Whether process `pid` of this host exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(holder: Holder, now: float | None = None) -> str | None:
    """Why `holder` no longer holds its lease, None while it does."""
    if holder.host == socket.gethostname() and not alive(holder.pid):
        return f"its process {holder.pid} on {holder.host} is gone"
    age = (now or time.time()) - holder.heartbeat
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s"
    return None


class Lease:
    """A held lease: renewed by a heartbeat thread until `release`."""

    def __init__(self, store: _Store, holder: Holder, version: Any, run: str) -> None:
        self.store, self.holder, self._version, self.run = store, holder, version, run
        self.lost: str | None = None
        """Set when the heartbeat finds the lease taken by another driver."""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="stoker-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.renew()
            except OSError:
                pass  # storage briefly unreachable: the next beat tries again

    def renew(self) -> None:
        with self._lock:
            if self._stop.is_set() or self.lost:
                return
            holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            version = self.store.replace(json.dumps(asdict(holder)), self._version)
            if version is not None:
                self.holder, self._version = holder, version
            else:
                self.lost = f"run {self.run}: its lease {self.store.where} was taken by another driver"

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, unless another driver holds it by now."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            if not self.lost:
                self.store.delete(self._version)


def store_for(run_dir) -> _Store:
    """The lease store of a `stoker.trainer.run_dir.RunDir`: beside the records locally, on
    S3 under the run's prefix (never in the staging copy, which is mirrored)."""
    if not run_dir.remote:
        return _LocalStore(run_dir.local)
    return _S3Store(run_dir._fs(), posixpath.join(run_dir._bare, LEASE), posixpath.join(run_dir.uri, LEASE))


def busy(run: str, holder: Holder, where: str) -> UserError:
    """The one line that refuses a second driver of a run."""
    return UserError(f"run {run} is being trained by {holder.describe()} (its lease {where} is live); "
                     "wait for it to end, or stop it first")


def live_holder(run_dir, run: str) -> tuple[Holder, str] | None:
    """The live holder of the run's lease and where the lease is, without taking it (for
    `stoker submit`, before it starts a job); None if the run is free."""
    store = store_for(run_dir)
    found = store.read()
    if found is None:
        return None
    holder = _parse(found[0], store.where, run)
    return (holder, store.where) if stale_reason(holder) is None else None


def acquire(run_dir, run: str, say: Callable[[str], None] | None = None) -> Lease:
    """Take the run's lease, or exit 2 naming the live holder. A stale lease is taken over
    (`say` gets one line about it)."""
    store = store_for(run_dir)
    for _ in range(5):  # each pass loses only to another driver's write; bounded all the same
        now = time.time()
        found = store.read()
        previous = _parse(found[0], store.where, run) if found else None
        if previous is not None and (reason := stale_reason(previous, now)) is None:
            raise busy(run, previous, store.where)
        holder = Holder(
            host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex,
            since=datetime.now(UTC).isoformat(timespec="seconds"), heartbeat=now,
            attempt=previous.attempt + 1 if previous else 1,
            submission_id=os.environ.get(SUBMISSION_ENV),
        )
        text = json.dumps(asdict(holder))
        version = store.create(text) if found is None else store.replace(text, found[1])
        if version is not None:
            if previous is not None and say is not None:
                say(f"run {run}: taking over the lease of {previous.describe()} ({reason}); resuming")
            return Lease(store, holder, version, run)
    raise UserError(f"run {run}: could not take its lease {store.where}: other drivers keep changing it")
