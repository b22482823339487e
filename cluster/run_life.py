"""A run's life as its driver sees it, one module for `stoker train`, `stoker tune` and
`stoker submit`: the lease that makes the driver the run's one writer, the registry states
(running, then succeeded, failed or stopped), the runs of a driver that died, SIGTERM taken as
Ctrl-C, and the line that says how to resume a stopped run.

The verbs keep what they print and how they train; what a run's record says, and when, is here.
"""

import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stoker.cluster.registry import (
    Registry,
    git_state,
    record_run,
    registry_for_run,
    run_fields,
    run_id_for,
)
from stoker.errors import UserError
from stoker.trainer.run_spec import RunSpec

if TYPE_CHECKING:
    from stoker.trainer.run_dir import RunDir


class RunLife:
    """One run's registry record, from the driver that holds its lease.

    `start` is the trainer's `on_start` (the run directory exists, its config is written);
    `end` records the outcome once. A run that never started leaves no record, so a run refused
    before training (scaling, batch size, metric) is not listed as failed.
    """

    def __init__(self, run: RunSpec, storage: "RunDir") -> None:
        self.run = run
        self.storage = storage
        self.started = False
        # The registry records where the run lives (its s3:// URI on S3), read from `storage`.
        self._where = {"uri": storage.uri} if storage.remote else {}

    @classmethod
    @contextlib.contextmanager
    def leased(cls, run: RunSpec, storage: "RunDir") -> Iterator["RunLife"]:
        """The run's lease for the block: a second driver of the run is refused before it changes
        anything, a dead driver's lease is taken over (the run resumes)."""
        lease = storage.take_lease(run.name, say=lambda line: print(f"stoker: {line}", file=sys.stderr, flush=True))
        try:
            yield cls(run, storage)
        finally:
            lease.release()

    def settle_dead_drivers(self) -> None:
        """Open the run's registry (one that cannot be opened fails here, before a cluster
        starts) and mark failed the runs there whose driver on this host died."""
        registry = registry_for_run(self.run)
        try:
            reconcile_dead_drivers(registry)
        finally:
            registry.close()

    def start(self, directory: Path) -> None:
        """The run directory exists: this driver is the run's, and the run is `running`."""
        self.storage.records.write_driver()
        record_run(directory, "running", run=self.run, **self._where)
        self.started = True

    def end(self, status: str, error: str | None = None, directory: Path | None = None) -> None:
        """Record the outcome of a started run (`succeeded`, `failed` or `stopped`)."""
        if self.started:
            record_run(directory or self.storage.local, status, run=self.run, error=error, **self._where)

    def resume_hint(self, command: str) -> str:
        """The line a stopped run ends with: what resumes it and from where."""
        storage = self.storage
        found = storage.checkpoints() if storage.remote or storage.local.exists() else []
        where = f"from its checkpoint of epoch {found[0][1]}" if found else "from the start (no checkpoint yet)"
        events = storage.records.events() if storage.local.exists() else []
        if found and events and events[-1]["event"] == "stopped" and events[-1]["epoch"] == found[0][1] + 1:
            # The workers checkpointed where they were (stoker.trainer.stop_flag): mid-epoch.
            last = events[-1]
            where = f"at epoch {last['epoch']}, step {last['micro_step']} of {last['steps_in_epoch']}"
        return f"stoker: interrupted: run {self.run.name} stopped; `{command}` resumes it {where}"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`, a job stop) stops the run as Ctrl-C does, for the block.

    Entered after `ray.init`, which installs Ray's own SIGTERM handler: that one ends the
    process at once, with no checkpoint and no record of the stop. Signals reach the main
    thread only, so elsewhere (a test's thread) this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def reconcile_dead_drivers(registry: Registry) -> None:
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


def root_cause(exc: BaseException) -> str:
    """The line of a failure worth recording: Ray wraps the worker's exception, and its last
    line is the one that says what went wrong."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def trial_recorder(run: RunSpec, storage: "RunDir") -> Callable[[Path, str, dict], None]:
    """`record(run_dir, status, fields)` for `stoker.tune.recording`: a trial's Train run in the
    registry the search's config records into (its `cluster.registry.url`, else the one in its
    `storage`, where `stoker train` records), not one under the experiment's trials/. A
    registry that cannot be opened fails here, as for `stoker train`."""
    from stoker.tune.trial import TRIALS_DIR

    registry_for_run(run).close()
    git = git_state(Path.cwd())

    def record(run_dir: Path, status: str, fields: dict) -> None:
        values = {**run_fields(run_dir), **fields}
        if storage.remote:  # the trial lives under the experiment's s3:// prefix, staged here
            uri = f"{storage.uri.rstrip('/')}/{TRIALS_DIR}/{run_dir.name}"
            checkpoint = values.get("checkpoint")
            values.update(run_dir=uri, checkpoint=f"{uri}/{Path(checkpoint).name}" if checkpoint else None)
        registry = registry_for_run(run)
        try:
            registry.upsert_run(run_id_for(run_dir), status=status, git_commit=git.commit, git_dirty=git.dirty,
                                **values)
        finally:
            registry.close()

    return record


def record_job_outcome(registry: Registry, run: RunSpec, run_id: str, status: str, client, submission_id: str,
                       address: str) -> None:
    """A followed job's outcome (its Ray job status and, when it failed, the job's message) in this
    machine's registry, with the run's metrics, score and best checkpoint read from its records
    on the shared storage. The job records them in the registry it sees (the default one under
    storage, or the cluster's STOKER_REGISTRY_URL), which need not be this one."""
    from stoker.cluster import jobs
    from stoker.trainer.run_dir import locate

    word = {"SUCCEEDED": "succeeded", "STOPPED": "stopped"}.get(status, "failed")
    error = None
    if word == "failed":
        message = jobs.job_message(client, submission_id)
        error = f"job {submission_id} {status}" + (f": {message}" if message else "")
    where = locate(run.storage, run.name, run.data.s3)
    try:
        where.pull_records()
    except UserError as exc:
        print(f"stoker: warning: {exc}; the registry has the job's status only", file=sys.stderr)
    id_file = where.records.run_id
    # The run directory is this run's when the job wrote our id into it; one the job never
    # reached (it failed first) is not created here.
    if id_file.is_file() and id_file.read_text().strip() == run_id:
        record_run(where.local, word, run=run, uri=where.uri if where.remote else None, error=error,
                   submission_id=submission_id, address=address)
    else:
        registry.upsert_run(run_id, status=word, error=error)
