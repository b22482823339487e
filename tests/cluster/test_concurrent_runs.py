"""Many runs, one storage: `stoker train` processes started at once on a fresh storage and one
registry, two of the runs started twice. Each distinct run is recorded once with its own
metrics, in order; each duplicate start is refused in one line; nothing else fails.

The processes join the session's Ray cluster (RAY_ADDRESS, as inside a Ray Job) instead of
starting one each: what is under test is the storage and the registry, not Ray's start-up.

Five starts of three runs, two epochs each, not the issue's eight of six: the suite has a time
budget, and what can go wrong is already there at this size (the schema race of a fresh
registry, a second driver of a live run, interleaved epochs, which two epochs show as well as
twenty). The racing writers at larger counts are test_registry_concurrency.py's (8 processes);
the same load on S3 storage and PostgreSQL, with a search beside it, is
test_concurrent_runs_remote.py's.
"""

import os
import subprocess
import sys
import time

import pytest

from stoker.cluster.registry import Registry, resolve_url
from stoker.trainer.run_dir import Records
from stoker.trainer.run_lease import LEASE
from tests.conftest import REPO, write_config

RUNS = ("load-a", "load-b", "load-c")
STARTS = ("load-a", "load-a", "load-b", "load-b", "load-c")


@pytest.mark.slow
def test_concurrent_trainings_share_one_storage_and_registry(ray_cluster, prepared, tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("STOKER_REGISTRY_URL", raising=False)
    storage = tmp_path / "runs"  # fresh: the registry's schema is created by the racing runs
    configs = {
        name: write_config(tmp_path, dict(
            prepared, name=name, storage=str(storage),
            train={**prepared["train"], "epochs": 2},
            # One small worker each: the three trainings share the session cluster's 2 CPUs
            # and leave CPU for their Ray Data readers (a worker per CPU would starve them).
            scaling={**prepared.get("scaling", {}), "num_workers": 1, "cpus_per_worker": 0.25},
        ), name=f"{name}.yaml")
        for name in RUNS
    }
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}
    logs = []
    processes = []
    for i, name in enumerate(STARTS):
        log = open(tmp_path / f"start-{i}.err", "w")
        logs.append(log)
        processes.append(subprocess.Popen([sys.executable, "-m", "stoker", "train", str(configs[name])],
                                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log))
    started = time.monotonic()
    try:
        codes = [p.wait(timeout=600) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    errors = [(tmp_path / f"start-{i}.err").read_text() for i in range(len(STARTS))]
    print(f"{len(STARTS)} starts ended in {time.monotonic() - started:.0f} s")

    for name in RUNS:
        starts = [i for i, n in enumerate(STARTS) if n == name]
        ok = [i for i in starts if codes[i] == 0]
        refused = [i for i in starts if codes[i] == 2]
        assert len(ok) == 1 and len(refused) == len(starts) - 1, (name, codes, errors)
        for i in refused:
            last = errors[i].strip().splitlines()[-1]
            assert last.startswith(f"stoker: error: run {name} is being trained by pid "), last
            assert "its lease" in last and "is live" in last
        epochs = [record["epoch"] for record in Records(storage / name).metrics()]
        assert epochs == [0, 1], (name, epochs)
        assert not (storage / name / LEASE).exists()  # released at the end

    registry = Registry(resolve_url(None, storage))
    try:
        records = registry.runs()
        assert sorted(r.name for r in records) == sorted(RUNS)
        assert all(r.status == "succeeded" and r.score is not None for r in records)
    finally:
        registry.close()
