"""Many runs, one storage, the shared kind: `stoker train` processes with `storage` on the
loopback S3 server and the registry on a loopback PostgreSQL server (STOKER_REGISTRY_URL, as a
team sets it), one run started twice, while a small `stoker tune` search on the same storage
records its trials in the same registry. Each distinct run is recorded once with its own
metrics and its epochs once and in order on S3; the duplicate start is refused in the lease's
one line (a conditional PUT on S3); the search's trials are recorded; nothing else fails.

Kept small (3 trainings, a 2-trial search of 1 epoch) because the suite has a time budget; the
local test (test_concurrent_runs.py) has the larger crowd on SQLite.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from stoker.cluster.registry import Registry
from stoker.trainer.run_dir import STAGING_ENV
from stoker.trainer.run_lease import LEASE
from tests.cluster.test_s3_storage import no_local_s3_dir
from tests.conftest import REPO, write_config
from tests.datasets.conftest import keys, s3_server  # noqa: F401 - the fixture

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")

BUCKET = "stoker-concurrent-runs"
RUNS = ("shared-a", "shared-b")
STARTS = ("shared-a", "shared-a", "shared-b")
SEARCH = "shared-search"


@pytest.mark.slow
def test_trainings_and_a_search_share_s3_storage_and_a_postgres_registry(
        ray_cluster, prepared, postgres, s3_server, tmp_path):  # noqa: F811 - the fixture
    import boto3
    import ray

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    with psycopg.connect(postgres["admin"], autocommit=True) as connection:
        connection.execute("CREATE DATABASE concurrent_runs")  # fresh: the racing runs create the schema
    url = f"postgresql+psycopg://stoker@127.0.0.1:{postgres['port']}/concurrent_runs"

    storage = f"s3://{BUCKET}/runs"
    # One small worker each: the runs share the session cluster's 2 CPUs with their readers.
    scaling = {"num_workers": 1, "cpus_per_worker": 0.25}
    base = dict(prepared, storage=storage, data={**prepared["data"], "s3": {"endpoint_url": s3_server}},
                scaling=scaling)
    configs = {name: write_config(tmp_path, dict(base, name=name, train={**prepared["train"], "epochs": 2}),
                                  name=f"{name}.yaml") for name in RUNS}
    search = write_config(tmp_path, dict(
        base, name="shared-tuned", train={**prepared["train"], "epochs": 1},
        tune={"name": SEARCH, "num_samples": 2, "searcher": "random", "seed": 5,
              "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-3, "high": 3e-2}}},
    ), name="search.yaml")

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled",
           "STOKER_REGISTRY_URL": url, STAGING_ENV: str(tmp_path / "staging")}
    commands = [["train", str(configs[name])] for name in STARTS] + [["tune", str(search)]]
    logs = [tmp_path / f"start-{i}.err" for i in range(len(commands))]
    processes = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "w") as sink:  # a file, not a pipe: Ray's lines never block a start
            processes.append(subprocess.Popen([sys.executable, "-m", "stoker", *command], cwd=tmp_path, env=env,
                                              stdout=sink, stderr=subprocess.STDOUT))
    started = time.monotonic()
    try:
        codes = [p.wait(timeout=600) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    outputs = [log.read_text() for log in logs]
    print(f"{len(commands)} starts ended in {time.monotonic() - started:.0f} s")

    assert codes[-1] == 0, outputs[-1][-3000:]  # the search
    recorded = {}
    registry = Registry(url)
    try:
        records = registry.runs()
    finally:
        registry.close()
    for record in records:
        recorded.setdefault(record.name, []).append(record)
    for name in RUNS:
        starts = [i for i, n in enumerate(STARTS) if n == name]
        ok = [i for i in starts if codes[i] == 0]
        refused = [i for i in starts if codes[i] == 2]
        assert len(ok) == 1 and len(refused) == len(starts) - 1, (name, codes, [outputs[i][-2000:] for i in starts])
        for i in refused:
            last = outputs[i].strip().splitlines()[-1]
            assert last.startswith(f"stoker: error: run {name} is being trained by pid "), last
            assert f"(its lease {storage}/{name}/{LEASE} is live)" in last, last
        body = client.get_object(Bucket=BUCKET, Key=f"runs/{name}/metrics.jsonl")["Body"].read().decode()
        lines = [json.loads(line) for line in body.splitlines()]
        assert [line["epoch"] for line in lines] == [0, 1], (name, body)
        assert f"runs/{name}/{LEASE}" not in keys(client, BUCKET, f"runs/{name}/")  # released at the end
        # Recorded once, succeeded, with its own metrics: the best epoch's, from its own records.
        final = json.loads(client.get_object(Bucket=BUCKET, Key=f"runs/{name}/final_metrics.json")["Body"].read())
        [record] = recorded.pop(name, [None])
        assert record is not None and record.status == "succeeded", (name, records)
        assert record.run_dir == f"{storage}/{name}" and record.metrics["test"] == final["test"]
        assert record.best_epoch == final["best_epoch"] and record.checkpoint.startswith(f"{storage}/{name}/checkpoint_")

    # The search's two trials, each recorded once with its own best epoch, under the search on S3.
    trials = sorted({k.split("/")[3] for k in keys(client, BUCKET, f"runs/{SEARCH}/trials/")})
    assert len(trials) == 2, trials
    assert sorted(recorded) == trials, (sorted(recorded), trials)
    for trial in trials:
        [record] = recorded[trial]
        assert record.status == "succeeded" and record.run_dir == f"{storage}/{SEARCH}/trials/{trial}"
        assert record.metric == "val_accuracy" and record.best_epoch == 0
        assert record.score == record.metrics["validation"]["accuracy"]
        assert record.config["train"]["optimizer"]["lr"] != prepared["train"]["optimizer"]["lr"]
    assert len({recorded[t][0].config["train"]["optimizer"]["lr"] for t in trials}) == 2
    no_local_s3_dir(tmp_path, REPO)
