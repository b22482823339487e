"""Many processes, one registry: a crowd of `stoker train`-like writers opening a fresh registry
at the same moment, and the one-line errors for a registry that is busy or not the registry's.

Real processes, not threads: SQLite's locks are file locks between processes, and the race the
schema lock closes is between interpreters that each create their own engine. The PostgreSQL
half of the race is in test_registry_postgres.py (it reuses `race`).
"""

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import event

from stoker.cli import main
from stoker.cluster import registry as registry_module
from stoker.cluster.registry import Registry, RegistryUnavailable
from stoker.errors import UserError
from tests.conftest import REPO

# One writer: open the registry fresh (creating its schema if nobody has), then record a run as
# `stoker train` does (running, then succeeded), all released together by a file barrier.
WRITER = r"""
import os, sys, time
from pathlib import Path
from sqlalchemy.engine import make_url
from stoker.cluster.registry import Registry

url, barrier, run_id, name = sys.argv[1:5]
make_url(url).get_dialect().import_dbapi()  # the driver's import is not part of the race
(Path(barrier) / f"ready-{run_id}").touch()
give_up = time.monotonic() + 600  # a test that failed before "go" must not leave it spinning
while not (Path(barrier) / "go").exists():
    if time.monotonic() > give_up or not Path(barrier).is_dir():
        sys.exit("no go from the test")
    time.sleep(0.002)
registry = Registry(url)
registry.upsert_run(run_id, name=name, status="running")
registry.upsert_run(run_id, status="succeeded", metrics={"writer": os.getpid()})
registry.close()
"""


def race(url: str, barrier: Path, count: int = 8, timeout: float = 60) -> list[tuple[str, subprocess.CompletedProcess]]:
    """`count` writer processes on `url`, started together once all have imported stoker;
    each one's run id and finished process."""
    barrier.mkdir(parents=True, exist_ok=True)
    ids = [f"race{i:02d}{os.getpid() % 10000:04d}" for i in range(count)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, url, str(barrier), run_id, f"run-{run_id}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=barrier)
        for run_id in ids
    ]
    try:
        deadline = time.monotonic() + timeout
        while len(list(barrier.glob("ready-*"))) < count:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.01)
        (barrier / "go").touch()
        finished = []
        for run_id, proc in zip(ids, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            finished.append((run_id, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)))
        return finished
    finally:
        for proc in procs:  # a failed race leaves no writer behind
            if proc.poll() is None:
                proc.kill()


def assert_each_recorded_once(url: str, finished) -> None:
    for _, proc in finished:
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    registry = Registry(url)
    rows = registry.runs()
    registry.close()
    assert sorted(r.id for r in rows) == sorted(run_id for run_id, _ in finished)
    assert {r.id: (r.name, r.status) for r in rows} == {run_id: (f"run-{run_id}", "succeeded") for run_id, _ in finished}
    assert len({r.metrics["writer"] for r in rows}) == len(finished)  # each row written by its own process


def test_eight_processes_open_a_fresh_sqlite_registry_at_once(tmp_path):
    database = tmp_path / "runs" / "registry.db"
    url = f"sqlite:///{database}"
    finished = race(url, tmp_path / "barrier")
    assert_each_recorded_once(url, finished)
    # The file is in write-ahead-log mode: readers and the writer do not block each other.
    assert sqlite3.connect(database).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_registry_locked_past_the_busy_timeout_is_said_to_be_busy_not_misconfigured(tmp_path, monkeypatch):
    monkeypatch.setattr(registry_module, "SQLITE_BUSY_S", 0.3)
    database = tmp_path / "registry.db"
    url = f"sqlite:///{database}"
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a write, for too long
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as opening:
        Registry(url)
    assert time.monotonic() - started >= 0.3  # it waited for the lock before giving up
    message = str(opening.value)
    assert message.startswith(f"registry {url} is unavailable: database is locked (another process held")
    assert "not a configuration problem" in message and "cluster.registry.url" not in message
    assert "\n" not in message
    holder.execute("ROLLBACK")

    # Once the lock is free it opens; a write that then meets a held lock says the same.
    registry = Registry(url)
    registry.upsert_run("r1", name="r1", status="running")
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(RegistryUnavailable, match="is unavailable: database is locked"):
        registry.upsert_run("r1", status="succeeded")
    # ...while reading goes on: readers take no lock in WAL mode.
    assert [(r.id, r.status) for r in registry.runs()] == [("r1", "running")]
    holder.execute("ROLLBACK")
    registry.upsert_run("r1", status="succeeded")
    assert registry.find_run("r1").status == "succeeded"
    registry.close()
    holder.close()


def test_a_database_whose_tables_are_not_the_registrys_is_refused_by_url(tmp_path, capsys):
    database = tmp_path / "other.db"
    other = sqlite3.connect(database)
    other.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, note TEXT)")  # another program's "runs"
    other.commit()
    other.close()
    url = f"sqlite:///{database}"
    with pytest.raises(UserError) as refused:
        Registry(url)
    assert not isinstance(refused.value, RegistryUnavailable)
    assert str(refused.value).startswith(
        f"cluster.registry.url: the database at {url} refused the registry's schema: "
        "it has a table 'runs' without the registry's columns name, status, created_at")
    # Nothing was written into it.
    assert sqlite3.connect(database).execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall() == [("runs",)]
    # On the command line: exit 2, one error line (after the line naming the registry read).
    assert main(["runs", "list", "--registry", url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"registry: {url}", f"stoker: error: {refused.value}"]



def test_a_full_disk_is_said_to_be_one_not_a_configuration_problem(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url)
    registry.upsert_run("r1", name="r1", status="running")
    # SQLite's own "database or disk is full", from a page limit on this process's connections:
    # what a full disk returns, without filling one.
    event.listen(registry.engine, "connect", lambda connection, _: connection.execute(
        "PRAGMA max_page_count = " + str(connection.execute("PRAGMA page_count").fetchone()[0])))
    registry.engine.dispose()
    with pytest.raises(RegistryUnavailable) as full:
        registry.upsert_run("r2", name="r2", status="running", metrics={"padding": "x" * 100_000})
    assert str(full.value) == (f"registry {url} is unavailable: database or disk is full (the disk holding it is full; "
                               "not a configuration problem: retry once that is fixed)")
    assert [r.id for r in registry.runs()] == ["r1"]  # the failed write left nothing behind
    registry.close()
