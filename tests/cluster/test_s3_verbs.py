"""Every verb that reads a dataset works on `s3://` with the config's `data.s3` options, on the
loopback S3 server: prepare -> train -> export -> evaluate -> monitor, the dataset and the new
data all on S3; an unknown bucket or refused credentials is exit 2 with one line, per verb."""

import json
import shutil

import pytest
import yaml

from stoker.cli import main
from tests.conftest import run_cli, run_config, write_config
from tests.datasets.conftest import bucket, s3_server, s3_with_auth  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

MISSING = "s3://no-such-bucket-stoker-x"


def one_line_error(capsys, *args: str) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("stoker: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def on_s3(ray_cluster, digits_csv, tmp_path_factory, s3_server):  # noqa: F811 - the fixture
    """The digits on S3, prepared to S3 and trained from there; (config path, config, run dir,
    bucket name)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = "stoker-verbs"
    client.create_bucket(Bucket=name)
    client.upload_file(str(digits_csv), name, "raw/digits.csv")
    client.upload_file(str(digits_csv), name, "new/digits.csv")
    root = tmp_path_factory.mktemp("s3verbs")
    config = run_config(f"s3://{name}/raw/digits.csv", f"s3://{name}/prepared/digits", root / "runs", name="on-s3")
    config["data"]["s3"] = {"endpoint_url": s3_server}
    config["data"]["rows_per_shard"] = 400  # several shard files per split, each read from S3
    path = write_config(root, config)
    assert main(["data", "prepare", str(path)]) == 0
    assert main(["train", str(path)]) == 0
    return path, config, root / "runs" / "on-s3", name


def test_prepare_train_export_evaluate_monitor_all_on_s3(on_s3, capsys):
    path, config, run_dir, name = on_s3
    prepared = f"s3://{name}/prepared/digits"
    assert json.loads((run_dir / "dataset.json").read_text())["path"] == prepared
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["test"]["accuracy"] > 0.8, final["test"]  # trained from the S3 shards

    code, out, err = run_cli(capsys, "export", str(run_dir))
    assert code == 0, err
    assert (run_dir / "export" / "model.safetensors").is_file()

    # The exported model scores the S3 dataset's test split as the run scored it.
    code, out, err = run_cli(capsys, "evaluate", str(run_dir), "--data", prepared, "--json")
    assert code == 0, err
    result = json.loads(out)
    test_rows = json.loads((run_dir / "dataset.json").read_text())["rows"]["test"]
    assert result["data"] == prepared and result["rows"] == test_rows
    assert result["metrics"]["accuracy"] == pytest.approx(final["test"]["accuracy"], abs=1e-6)
    assert result["metrics"]["loss"] == pytest.approx(final["test"]["loss"], rel=1e-4)

    # New data on S3: the rows the run was prepared from, so no drift and no degradation.
    code, out, err = run_cli(capsys, "monitor", str(run_dir), "--data", f"s3://{name}/new/digits.csv", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["rows"] == 1797 and report["data"] == f"s3://{name}/new/digits.csv"
    assert report["model"] == "export" and not report["breached"]
    assert {m["metric"] for m in report["metrics"]} >= {"accuracy", "loss"}

    # The search reads the same S3 manifest before it starts (a bad metric is refused after it).
    tune = dict(config, tune={"metric": "val_rmse", "space": {"train.optimizer.lr": {"dist": "uniform", "low": 0.001, "high": 0.01}}})
    err = one_line_error(capsys, "tune", str(write_config(path.parent, tune, "tune.yaml")))
    assert "tune.metric: 'val_rmse' is never reported for classification" in err


def test_an_unknown_bucket_is_one_line_and_exit_2_for_every_verb(on_s3, capsys, tmp_path):
    path, config, run_dir, _ = on_s3
    elsewhere = dict(config, data={**config["data"], "output": f"{MISSING}/prepared"})
    moved = write_config(tmp_path, elsewhere)
    assert "no-such-bucket-stoker-x" in one_line_error(capsys, "train", str(moved))
    tune = dict(elsewhere, tune={"space": {"train.optimizer.lr": {"dist": "uniform", "low": 0.001, "high": 0.01}}})
    assert "no-such-bucket-stoker-x" in one_line_error(capsys, "tune", str(write_config(tmp_path, tune, "tune.yaml")))
    # submit reads an s3:// dataset before it contacts (or uploads to) any cluster.
    assert "no-such-bucket-stoker-x" in one_line_error(capsys, "submit", str(moved), "--address", "http://127.0.0.1:9")
    assert "no-such-bucket-stoker-x" in one_line_error(capsys, "evaluate", str(run_dir), "--data", f"{MISSING}/p")
    assert "no-such-bucket-stoker-x" in one_line_error(capsys, "monitor", str(run_dir), "--data", f"{MISSING}/new.csv")
    # A run whose dataset has gone: export and monitor say so.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    (copy / "dataset.json").write_text(json.dumps({**json.loads((run_dir / "dataset.json").read_text()),
                                                   "path": f"{MISSING}/prepared"}))
    assert "no-such-bucket-stoker-x" in one_line_error(capsys, "export", str(copy))


def test_refused_credentials_are_one_line_and_exit_2(on_s3, capsys, tmp_path, monkeypatch, s3_with_auth):  # noqa: F811
    endpoint, private, _admin, nobody = s3_with_auth
    _, config, run_dir, _ = on_s3
    # The run's own data options point at the authenticating server for these reads.
    locked = tmp_path / "locked"
    shutil.copytree(run_dir, locked, ignore=shutil.ignore_patterns("checkpoint_*"))
    run_config_yaml = yaml.safe_load((locked / "config.yaml").read_text())
    run_config_yaml["data"]["s3"] = {"endpoint_url": endpoint}
    (locked / "config.yaml").write_text(yaml.safe_dump(run_config_yaml))
    (locked / "export" / "config.yaml").write_text(yaml.safe_dump(run_config_yaml))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", nobody[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", nobody[1])
    err = one_line_error(capsys, "evaluate", str(locked), "--data", f"s3://{private}/prepared")
    assert "access denied" in err or "cannot read" in err, err
    # monitor reads the run's dataset first, with the same refused credentials.
    err = one_line_error(capsys, "monitor", str(locked), "--data", f"s3://{private}/raw/in.csv")
    assert "access denied" in err or "cannot read" in err, err
