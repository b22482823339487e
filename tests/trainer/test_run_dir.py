"""Where a run directory lives (stoker.trainer.run_dir), without an S3 server: local storage
keeps its one directory, `s3://` storage maps to a local staging copy of the records and to
Ray Train's (bucket/prefix, pyarrow filesystem) pair. The S3 round trip is in
tests/cluster/test_s3_storage.py."""

import json
import os

import pytest
import yaml

from stoker.cli import main
from stoker.cluster.registry import resolve_url
from stoker.datasets.config import S3Config
from stoker.errors import UserError
from stoker.trainer import checkpoints as ckpt
from stoker.trainer import run_dir
from stoker.trainer.run_dir import STAGING_ENV, Records, at, find_on_s3, locate, staging_root


def test_local_storage_is_the_run_directory_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = locate("runs", "r1")
    assert run.local == tmp_path / "runs" / "r1" and run.uri == str(tmp_path / "runs" / "r1")
    assert not run.remote
    # Ray Train gets the parent as before, and no filesystem of its own.
    assert run.ray_storage() == (str(tmp_path / "runs"), None)
    assert at(str(tmp_path / "runs" / "r1")) == run
    assert find_on_s3("r1", "runs") is None and find_on_s3(str(run.local), "runs") is None


def test_s3_storage_stages_records_locally_and_hands_ray_the_bucket_path(tmp_path, monkeypatch):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    run = locate("s3://bucket/team/runs/", "r1", S3Config(endpoint_url="http://127.0.0.1:9", region="eu-west-1"))
    assert run.remote and run.uri == "s3://bucket/team/runs/r1"
    assert run.local == tmp_path / "staging" / "bucket" / "team" / "runs" / "r1"
    path, fs = run.ray_storage()
    # Train V2: with a storage_filesystem the path is the bucket path without its scheme.
    assert path == "bucket/team/runs"
    s3fs = fs.handler.fs  # pyarrow's interface over s3fs, credentials and endpoint carried along
    assert s3fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}
    assert s3fs.key == "k" and s3fs.secret == "s"
    assert at("s3://bucket/team/runs/r1", run.s3) == run
    # Nothing of the URI's scheme ends up in a local path.
    assert "s3:" not in str(run.local)


def test_other_url_schemes_are_refused_not_made_local_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^storage: gs://bucket/runs: only a directory or an s3:// URI"):
        locate("gs://bucket/runs", "r1")
    assert list(tmp_path.iterdir()) == []


def test_staging_defaults_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(STAGING_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert staging_root("s3://b/p") == tmp_path / "stoker" / "runs" / "b" / "p"


def test_the_default_registry_of_s3_storage_is_a_local_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path))
    monkeypatch.delenv("STOKER_REGISTRY_URL", raising=False)
    assert resolve_url(None, "s3://bucket/runs") == f"sqlite:///{tmp_path / 'bucket' / 'runs' / 'registry.db'}"
    assert resolve_url(None, str(tmp_path / "runs")) == f"sqlite:///{tmp_path / 'runs' / 'registry.db'}"


def test_ray_owned_files_are_not_records():
    assert run_dir._is_record("config.yaml") and run_dir._is_record("tensorboard/events.out")
    assert run_dir._is_record("run_id") and run_dir._is_record("metrics.jsonl")
    assert not run_dir._is_record("checkpoint_2026-11-30_16-00-00.123456/stoker_state.json")
    assert not run_dir._is_record("checkpoint_manager_snapshot.json")
    assert not run_dir._is_record(".validate_storage_marker")
    assert not run_dir._is_record("export/model.safetensors")  # `stoker export`'s local output


def test_the_state_file_name_matches_the_checkpoint_module():
    # Named twice so the CLI can import run_dir without torch; the two must agree.
    assert run_dir._STATE_FILE == ckpt.STATE_FILE


def test_local_records_and_checkpoints_read_from_the_run_directory(tmp_path):
    run = locate(str(tmp_path), "r1")
    assert run.read_record("final_metrics.json") is None and run.checkpoints() == []
    for epoch, name in ((0, "checkpoint_a"), (2, "checkpoint_c"), (1, "checkpoint_b")):
        (run.local / name).mkdir(parents=True)
        (run.local / name / ckpt.STATE_FILE).write_text(json.dumps({"epoch": epoch}))
    (run.local / "final_metrics.json").write_text('{"best_epoch": 1}')
    assert run.checkpoints() == [("checkpoint_c", 2), ("checkpoint_b", 1), ("checkpoint_a", 0)]
    assert json.loads(run.read_record("final_metrics.json")) == {"best_epoch": 1}
    # The S3-only operations leave local storage alone.
    run.pull_records()
    run.push_records()
    run.check_bucket()
    assert (run.local / "checkpoint_a").is_dir()


def test_find_on_s3_takes_the_endpoint_the_staged_config_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path))
    staged = tmp_path / "bucket" / "runs" / "r1"
    staged.mkdir(parents=True)
    (staged / "config.yaml").write_text(yaml.safe_dump({"data": {"s3": {"endpoint_url": "http://127.0.0.1:5"}}}))
    for found in (find_on_s3("r1", "s3://bucket/runs"), find_on_s3("s3://bucket/runs/r1", "runs")):
        assert found.uri == "s3://bucket/runs/r1" and found.local == staged
        assert found.s3.endpoint_url == "http://127.0.0.1:5"


def test_tune_refuses_other_url_schemes_before_starting_anything(tmp_path, capsys, monkeypatch):
    # s3:// storage searches (tests/cluster/test_s3_tune.py); gs:// would be a local `gs:` directory.
    monkeypatch.chdir(tmp_path)
    config = {"name": "t", "storage": "gs://bucket/runs",
              "data": {"source": "x.csv", "label": "y", "output": str(tmp_path / "p")},
              "tune": {"num_samples": 2, "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stoker: error: storage: gs://bucket/runs: only a directory or an s3://"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_records_read_what_they_wrote_and_drop_rerun_epochs(tmp_path):
    from stoker.trainer.run_dir import Records, finished

    records = Records(tmp_path / "r")
    assert records.config() is None and records.final() is None and records.metrics() == [] and not records.exists()
    records.write_config({"name": "r", "model": {"name": "mlp"}})
    records.write_final({"best_epoch": 1, "epochs_trained": 3, "stopped_early": False})
    assert records.exists() and records.config()["model"] == {"name": "mlp"}
    assert finished(records.final(), 3) and not finished(records.final(), 4) and not finished(None, 1)
    assert finished({"epochs_trained": 2, "stopped_early": True}, 10)
    records.metrics_path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (0, 1, 2, 3)))
    records.drop_metrics(from_epoch=2)
    assert [m["epoch"] for m in records.metrics()] == [0, 1]
    (records.directory / run_dir.FINAL).write_text("{half")  # a half-copied record reads as absent
    assert records.final() is None
    records.write_driver()
    assert records.driver()["pid"] == os.getpid()


def test_the_world_size_history_names_each_resize_and_the_size_now(tmp_path):
    from stoker.commands.tables import workers_cell

    records = Records(tmp_path)
    assert records.scaling() is None  # no epoch yet
    epochs = [(0, 2), (1, 2), (2, 1), (3, 1), (4, 3)]
    records.metrics_path.write_text("".join(json.dumps({"epoch": e, "world_size": w}) + "\n" for e, w in epochs))
    # A drain's event (stoker.trainer.tracking.RunLog) beside a worker failure's.
    records.events_path.write_text(
        json.dumps({"event": "worker_failed", "ranks": [1]}) + "\n"
        + json.dumps({"event": "preempted", "epoch": 2, "micro_step": 7, "steps_in_epoch": 20, "nodes": ["ab12"],
                      "ranks": [1], "deadline_ms": None, "world_size": 2, "checkpoint": None}) + "\n")
    scaling = records.scaling()
    assert scaling == {"workers": 3, "resizes": [{"epoch": 2, "workers_from": 2, "workers_to": 1},
                                                 {"epoch": 4, "workers_from": 1, "workers_to": 3}],
                       "preemptions": [{"epoch": 2, "micro_step": 7, "nodes": ["ab12"]}]}
    assert workers_cell(scaling) == "2>1>3"
    records.metrics_path.write_text(json.dumps({"epoch": 0, "world_size": 2}) + "\n")
    assert workers_cell(records.scaling()) == "2" and workers_cell(None) is None
