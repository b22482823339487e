"""`stoker tune` with the dataset and `storage` on `s3://` (the loopback S3 server): the search runs
in a staging copy of its experiment and everything it wrote (Tune's state, each trial's Train
run with its checkpoints, results, best.yaml, report) lands under `s3://bucket/runs/<tune.name>/`;
a second machine (an empty staging root) running the same command continues that search from
S3 instead of training again; nothing is ever written to a local `s3:` directory; storage in an
unknown bucket is exit 2."""

import json
from pathlib import Path

import pytest
import yaml

from stoker.trainer.run_dir import STAGING_ENV
from tests.cluster.test_s3_storage import no_local_s3_dir
from tests.conftest import REPO, run_cli, run_config, write_config
from tests.datasets.conftest import keys, s3_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

BUCKET = "stoker-tune-storage"
SEARCH = "search-on-s3"


@pytest.fixture(scope="module")
def on_s3(ray_cluster, digits_csv, tmp_path_factory, s3_server):  # noqa: F811 - the fixture
    """The digits prepared to S3, and a 2-trial search config storing on S3."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(digits_csv), BUCKET, "raw/digits.csv")
    root = tmp_path_factory.mktemp("s3tune")
    config = run_config(f"s3://{BUCKET}/raw/digits.csv", f"s3://{BUCKET}/prepared/digits", f"s3://{BUCKET}/runs",
                        name="tuned", scaling={"num_workers": 1, "cpus_per_worker": 0.25, "data_cpus": 1},
                        tune={"name": SEARCH, "num_samples": 2, "searcher": "random", "seed": 3,
                              "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-3, "high": 3e-2}}})
    config["model"]["hidden"] = [16]
    config["train"].update(batch_size=128, deepspeed={"zero_stage": 1})
    config["data"]["s3"] = {"endpoint_url": s3_server}
    path = write_config(root, config)
    (root / "work").mkdir()
    return path, root, client


def search_keys(client) -> list[str]:
    return [k.removeprefix(f"runs/{SEARCH}/") for k in keys(client, BUCKET, f"runs/{SEARCH}/")]


def test_a_search_on_s3_lands_there_and_continues_on_another_machine(on_s3, capsys, monkeypatch):
    path, root, client = on_s3
    monkeypatch.setenv(STAGING_ENV, str(root / "machine-a"))
    monkeypatch.chdir(root / "work")  # where a run dir `Path("s3://...")` would have landed
    code, out, err = run_cli(capsys, "data", "prepare", str(path))
    assert code == 0, err
    code, out, err = run_cli(capsys, "tune", str(path))
    assert code == 0, out + err
    assert f"experiment: s3://{BUCKET}/runs/{SEARCH}  (staged at {root / 'machine-a' / BUCKET / 'runs' / SEARCH})" in out

    stored = search_keys(client)
    for name in ("stoker_experiment.json", "results.csv", "results.parquet", "best.yaml", "report.html",
                 ".stoker_pushed"):
        assert name in stored, (name, stored)
    assert any(k.startswith("experiment_state") for k in stored), stored
    # Each trial's Train run: its records and its checkpoints, all on S3.
    trials = sorted({k.split("/")[1] for k in stored if k.startswith("trials/")})
    assert len(trials) == 2, stored
    for trial in trials:
        run = [k.removeprefix(f"trials/{trial}/") for k in stored if k.startswith(f"trials/{trial}/")]
        assert {"metrics.jsonl", "config.yaml", "checkpoint_manager_snapshot.json"} <= set(run), run
        assert any(k.startswith("checkpoint_") and k.endswith("stoker_state.json") for k in run), run
        lines = client.get_object(Bucket=BUCKET, Key=f"runs/{SEARCH}/trials/{trial}/metrics.jsonl")["Body"].read()
        assert [json.loads(line)["epoch"] for line in lines.decode().splitlines()] == [0, 1]
    best = yaml.safe_load(client.get_object(Bucket=BUCKET, Key=f"runs/{SEARCH}/best.yaml")["Body"].read())
    # The best trial's config trains on the same S3 data, and its runs go to the same storage.
    assert best["storage"] == f"s3://{BUCKET}/runs" and best["data"]["output"] == f"s3://{BUCKET}/prepared/digits"
    pushed = {t: client.get_object(Bucket=BUCKET, Key=f"runs/{SEARCH}/trials/{t}/metrics.jsonl")["ETag"] for t in trials}

    # Another machine: nothing staged there. The same command finds the finished search on S3
    # and continues it: nothing is trained again, the results are the same trials'.
    monkeypatch.setenv(STAGING_ENV, str(root / "machine-b"))
    code, out, err = run_cli(capsys, "tune", str(path))
    assert code == 0, out + err
    assert f"continuing search {SEARCH}" in out, out
    staged = root / "machine-b" / BUCKET / "runs" / SEARCH
    table = [line for line in (staged / "results.csv").read_text().splitlines()[1:] if line]
    assert len(table) == 2 and all("completed" in line for line in table), table
    for trial, etag in pushed.items():
        assert client.get_object(Bucket=BUCKET, Key=f"runs/{SEARCH}/trials/{trial}/metrics.jsonl")["ETag"] == etag
    no_local_s3_dir(Path.cwd(), path.parent, REPO)

    # Storage in a bucket that does not exist: one line naming it, exit 2, nothing staged.
    config = yaml.safe_load(path.read_text())
    config["storage"] = "s3://no-such-bucket-stoker-t/runs"
    code, out, err = run_cli(capsys, "tune", str(write_config(root, config, "elsewhere.yaml")))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("stoker: error: storage: bucket 'no-such-bucket-stoker-t' does not exist"), err
    assert not (root / "machine-b" / "no-such-bucket-stoker-t").exists()
