"""`storage: s3://bucket/runs` on the loopback S3 server: prepare (dataset on S3) -> train (Ray
Train writes the checkpoints to S3, the records are staged locally and uploaded) -> a resume
from another machine (no staging copy) continues the run from S3 -> export (only the chosen
checkpoint fetched) -> evaluate (the run's own test metrics) -> registry; nothing is ever
written to a local `s3:` directory; monitor finds the run through the registry. An unknown
bucket is exit 2 before Ray starts."""

import json
import shutil
from pathlib import Path

import pytest

from stoker.cli import main
from stoker.datasets.config import S3Config
from stoker.trainer.run_dir import STAGING_ENV, RunDir
from tests.conftest import REPO, run_cli, run_config, write_config
from tests.datasets.conftest import keys, s3_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

BUCKET = "stoker-run-storage"
NAME = "on-s3-storage"


def no_local_s3_dir(*roots: Path) -> None:
    for root in roots:
        assert not (root / "s3:").exists(), f"a local s3: directory was written under {root}"


@pytest.fixture(scope="module")
def on_s3_storage(ray_cluster, digits_csv, tmp_path_factory, s3_server):  # noqa: F811 - the fixture
    """The digits prepared to S3 and trained with `storage: s3://BUCKET/runs` (2 epochs), from a
    scratch working directory; yields (config path, config, staging root, boto3 client, cwd)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(digits_csv), BUCKET, "raw/digits.csv")
    root = tmp_path_factory.mktemp("s3storage")
    config = run_config(f"s3://{BUCKET}/raw/digits.csv", f"s3://{BUCKET}/prepared/digits", f"s3://{BUCKET}/runs",
                        name=NAME)
    config["data"]["s3"] = {"endpoint_url": s3_server}
    path = write_config(root, config)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(STAGING_ENV, str(root / "staging"))
        mp.delenv("STOKER_REGISTRY_URL", raising=False)
        (root / "work").mkdir()
        mp.chdir(root / "work")  # where a run dir `Path("s3://...")` would have landed
        assert main(["data", "prepare", str(path)]) == 0
        assert main(["train", str(path)]) == 0
        yield path, config, root / "staging", client, Path.cwd()


def run_keys(client) -> list[str]:
    return [k.removeprefix(f"runs/{NAME}/") for k in keys(client, BUCKET, f"runs/{NAME}/")]


def test_checkpoints_and_records_are_on_s3_and_nothing_in_a_local_s3_dir(on_s3_storage):
    path, config, staging, client, cwd = on_s3_storage
    stored = run_keys(client)
    # Ray Train's own files: checkpoints (every rank's DeepSpeed shards) and its snapshot.
    checkpoints = sorted({k.split("/")[0] for k in stored if k.startswith("checkpoint_2")})
    assert len(checkpoints) >= 1 and "checkpoint_manager_snapshot.json" in stored
    for name in checkpoints:
        assert f"{name}/stoker_state.json" in stored and f"{name}/checksums_rank1.json" in stored
    # stoker's records, uploaded from the staging copy.
    for record in ("config.yaml", "dataset.json", "deepspeed_config.json", "metrics.jsonl", "final_metrics.json",
                   "report.html", "driver.json", "run_id"):
        assert record in stored, record
    assert any(k.startswith("tensorboard/") for k in stored)
    final = json.loads(client.get_object(Bucket=BUCKET, Key=f"runs/{NAME}/final_metrics.json")["Body"].read())
    assert final["epochs_trained"] == 2 and final["checkpoint"] in checkpoints
    epochs = [json.loads(line)["epoch"] for line in
              client.get_object(Bucket=BUCKET, Key=f"runs/{NAME}/metrics.jsonl")["Body"].read().decode().splitlines()]
    assert epochs == [0, 1]
    # The staging copy holds the records and no checkpoint; no local `s3:` path anywhere.
    local = staging / BUCKET / "runs" / NAME
    assert (local / "final_metrics.json").is_file() and not list(local.glob("checkpoint_*"))
    no_local_s3_dir(cwd, path.parent, REPO)


def test_a_resume_without_the_staging_copy_continues_the_run_from_s3(on_s3_storage, capsys):
    path, config, staging, client, cwd = on_s3_storage
    # Another machine: no local records. One more epoch continues the run.
    shutil.rmtree(staging / BUCKET / "runs" / NAME)
    longer = {**config, "train": {**config["train"], "epochs": 3}}
    resumed = write_config(path.parent, longer, "longer.yaml")
    code, out, err = run_cli(capsys, "train", str(resumed))
    assert code == 0, err
    trained = [line.split()[1] for line in out.splitlines() if line.startswith("epoch")]
    assert trained == ["2"], out  # Ray Train found the snapshot on S3 and resumed after epoch 1
    assert f"run directory: s3://{BUCKET}/runs/{NAME}" in out
    # The records downloaded first: metrics.jsonl goes on with epochs 0 and 1, each once.
    lines = client.get_object(Bucket=BUCKET, Key=f"runs/{NAME}/metrics.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    final = json.loads(client.get_object(Bucket=BUCKET, Key=f"runs/{NAME}/final_metrics.json")["Body"].read())
    assert final["epochs_trained"] == 3
    # Finished: asking again trains nothing and starts no cluster.
    code, out, err = run_cli(capsys, "train", str(resumed))
    assert code == 0 and "already finished" in out, out + err
    no_local_s3_dir(cwd, path.parent, REPO)


def test_export_fetches_only_the_best_checkpoint_and_evaluate_matches_the_run(on_s3_storage, capsys, monkeypatch, tmp_path):
    path, config, staging, client, cwd = on_s3_storage
    final = json.loads(client.get_object(Bucket=BUCKET, Key=f"runs/{NAME}/final_metrics.json")["Body"].read())
    fetched: list[str] = []
    download = RunDir.download_checkpoint

    def counting(self, name, into):
        fetched.append(name)
        return download(self, name, into)

    monkeypatch.setattr(RunDir, "download_checkpoint", counting)
    # By the run's config: the export lands in the local staging copy of the run directory.
    code, out, err = run_cli(capsys, "export", str(path))
    assert code == 0, err
    assert fetched == [final["checkpoint"]]
    export = staging / BUCKET / "runs" / NAME / "export"
    meta = json.loads((export / "model.json").read_text())
    assert meta["epoch"] == final["best_epoch"] and meta["checkpoint"] == final["checkpoint"]
    assert (export / "model.safetensors").is_file()

    code, out, err = run_cli(capsys, "evaluate", str(path), "--data", f"s3://{BUCKET}/prepared/digits", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == str(export)
    assert result["metrics"]["accuracy"] == pytest.approx(final["test"]["accuracy"], abs=1e-6)
    assert result["metrics"]["loss"] == pytest.approx(final["test"]["loss"], rel=1e-4)

    # By URI, to --output: the same weights; the local export is never uploaded.
    code, out, err = run_cli(capsys, "export", f"s3://{BUCKET}/runs/{NAME}", "--output", str(tmp_path / "exp"))
    assert code == 0, err
    assert (tmp_path / "exp" / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    assert not any(k.startswith("export/") for k in run_keys(client))
    # A later pull (a resume) keeps the local export.
    s3 = S3Config.model_validate(config["data"]["s3"])
    RunDir(f"s3://{BUCKET}/runs/{NAME}", staging / BUCKET / "runs" / NAME, s3).pull_records()
    assert (export / "model.safetensors").is_file()
    no_local_s3_dir(cwd, path.parent, REPO)


def test_the_registry_records_the_s3_run_and_registers_its_best_checkpoint(on_s3_storage, capsys):
    path, config, staging, client, cwd = on_s3_storage
    code, out, err = run_cli(capsys, "runs", "list", "--storage", f"s3://{BUCKET}/runs", "--json")
    assert code == 0, err
    records = [r for r in map(json.loads, out.splitlines()) if r["name"] == NAME]  # JSON lines
    assert records and records[0]["status"] == "succeeded"
    final = json.loads(client.get_object(Bucket=BUCKET, Key=f"runs/{NAME}/final_metrics.json")["Body"].read())
    assert records[0]["run_dir"] == f"s3://{BUCKET}/runs/{NAME}"
    assert records[0]["checkpoint"] == f"s3://{BUCKET}/runs/{NAME}/{final['checkpoint']}"
    assert (staging / BUCKET / "runs" / "registry.db").is_file()

    code, out, err = run_cli(capsys, "models", "register", NAME, "--name", "digits", "--config", str(path))
    assert code == 0, err
    assert f"epoch {final['best_epoch']}" in out and f"s3://{BUCKET}/runs/{NAME}/{final['checkpoint']}" in out

    # Monitor by the registry's name: the run's records come from S3, the model from its export.
    code, out, err = run_cli(capsys, "monitor", NAME, "--config", str(path), "--data", f"s3://{BUCKET}/raw/digits.csv",
                             "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["rows"] == 1797 and report["model"] == "export" and not report["breached"]


def test_storage_on_a_missing_bucket_is_refused_before_ray_starts(on_s3_storage, capsys, monkeypatch):
    path, config, staging, client, cwd = on_s3_storage
    import stoker.cluster.connect

    def no_cluster(*args, **kwargs):
        raise AssertionError("the cluster was started for a run that must be refused")

    monkeypatch.setattr(stoker.cluster.connect, "connect_embedded", no_cluster)
    bad = write_config(path.parent, {**config, "name": "nowhere", "storage": "s3://no-such-bucket-stoker-x/runs"},
                       "bad.yaml")
    code, out, err = run_cli(capsys, "train", str(bad))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("stoker: error: storage: ") and "Traceback" not in err, err
    assert "no-such-bucket-stoker-x" in err
    no_local_s3_dir(cwd, path.parent, REPO)
