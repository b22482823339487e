"""Fixtures of the cluster tests: a real PostgreSQL server on loopback, started by the tests
(the machine's `initdb`/`postgres`, Debian's `postgresql` package), for the registry's
PostgreSQL tests and the concurrent-runs load test on PostgreSQL."""

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.ports import free_port


def server_bin() -> Path | None:
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "postgres").is_file()), None)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust auth; yields its admin URL."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
    binaries = server_bin()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, postgres) on PATH or in /usr/lib/postgresql/*/bin")
    # PostgreSQL refuses to run as root: run it as its own system user when we are root.
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    # Not under pytest's tmp dirs: those are root-only (0700), and the server user must enter.
    root = Path(tempfile.mkdtemp(prefix="stoker-pg-", dir="/tmp"))
    if user:
        os.chown(root, user.pw_uid, user.pw_gid)
    as_user = {"user": user.pw_uid, "group": user.pw_gid} if user else {}
    data = root / "data"
    subprocess.run([binaries / "initdb", "-D", data, "-U", "stoker", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, **as_user)
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [binaries / "postgres", "-D", data, "-p", str(port), "-k", root, "-c", "listen_addresses=127.0.0.1",
         "-c", "fsync=off", "-c", "max_connections=50"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user,
    )
    admin = f"host=127.0.0.1 port={port} user=stoker dbname=postgres"
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(admin, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"PostgreSQL did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
    try:
        yield {"port": port, "admin": admin}
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown: roll back, close connections, exit
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)
