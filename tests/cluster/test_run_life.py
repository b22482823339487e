"""A run's life as its driver records it (stoker.cluster.run_life), shared by `stoker train`,
`stoker tune` and `stoker submit`: SIGTERM taken as Ctrl-C, a dead driver's runs, a stopped run's
resume line, a followed job's outcome. The end-to-end stop is in tests/trainer/test_train_lifecycle.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stoker.cluster.registry import Registry, resolve_url
from stoker.cluster.run_life import reconcile_dead_drivers, sigterm_as_interrupt


def test_sigterm_interrupts_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the block


def test_a_run_whose_driver_died_is_marked_failed_at_the_next_start(tmp_path, monkeypatch):
    import socket

    from stoker.trainer.run_dir import DRIVER

    monkeypatch.delenv("STOKER_REGISTRY_URL", raising=False)
    registry = Registry(resolve_url(None, tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("orphan", dead.pid), ("alive", os.getpid())):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / DRIVER).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
        registry.upsert_run(f"id-{name}", name=name, status="running", run_dir=str(run_dir))
    reconcile_dead_drivers(registry)
    assert registry.find_run("id-orphan").status == "failed"
    assert f"pid {dead.pid}" in registry.find_run("id-orphan").error
    assert registry.find_run("id-alive").status == "running"
    registry.close()


def test_a_run_is_recorded_only_once_started_and_its_stop_line_names_where_it_resumes(tmp_path, monkeypatch):
    from stoker.cluster.run_life import RunLife
    from stoker.config import parse_config
    from stoker.trainer.run_dir import locate
    from tests.conftest import run_config

    monkeypatch.delenv("STOKER_REGISTRY_URL", raising=False)
    run = parse_config(run_config(tmp_path / "d.csv", tmp_path / "p", tmp_path / "runs", name="life"), "run.yaml")
    storage = locate(run.storage, run.name, run.data.s3)
    with RunLife.leased(run, storage) as life:
        life.settle_dead_drivers()
        life.end("failed", error="refused before training")  # not started: no record
        assert Registry(resolve_url(None, tmp_path / "runs")).runs() == []
        life.start(storage.local)
        assert storage.records.driver()["pid"] == os.getpid()
        life.end("stopped", error="interrupted")
        assert life.resume_hint("stoker train run.yaml") == (
            "stoker: interrupted: run life stopped; `stoker train run.yaml` resumes it from the start (no checkpoint yet)")
    [record] = Registry(resolve_url(None, tmp_path / "runs")).runs()
    assert (record.name, record.status, record.error) == ("life", "stopped", "interrupted")
    assert record.config["name"] == "life"
