"""A search's experiment directory on `s3://` storage (stoker.tune.storage), on the loopback S3
server without Ray: the staging copy is uploaded when the block ends, files deleted locally are
deleted on S3, a newer push from another machine is pulled, a local copy newer than S3's (a
search killed here before it pushed) is kept, `fresh` deletes both. And Tune's trial
runtime_env never carries the driver's AWS credentials."""

import os
import time

import pytest
from ray.tune.execution.class_cache import _ActorClassCache

from stoker.config import parse_config
from stoker.errors import UserError
from stoker.ray_internals import TRIAL_CREDENTIALS, no_credentials_in_trial_env
from stoker.trainer.run_dir import STAGING_ENV
from stoker.tune.storage import SYNC_FILE, experiment_storage, mirrored, staging_notice
from tests.datasets.conftest import bucket, keys, s3_server  # noqa: F401 - fixtures


def search_run(bucket_name: str, endpoint: str, name: str = "exp"):
    return parse_config({
        "name": "r", "storage": f"s3://{bucket_name}/runs",
        "data": {"source": "d.csv", "label": "y", "output": "p", "s3": {"endpoint_url": endpoint}},
        "tune": {"name": name, "space": {"train.optimizer.lr": {"dist": "uniform", "low": 0.001, "high": 0.01}}},
    }, "test")


def stored(client, name: str) -> list[str]:
    return [k.removeprefix("runs/exp/") for k in keys(client, name, "runs/exp/")]


def test_the_staging_copy_is_mirrored_to_s3_and_pulled_only_when_s3_is_newer(bucket, tmp_path, monkeypatch):  # noqa: F811
    endpoint, name, client = bucket
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "here"))
    storage = experiment_storage(search_run(name, endpoint))
    assert storage.uri == f"s3://{name}/runs/exp" and storage.local == tmp_path / "here" / name / "runs" / "exp"
    with mirrored(storage):
        (storage.local / "trials" / "t1" / "checkpoint_000000").mkdir(parents=True)
        (storage.local / "trials" / "t1" / "checkpoint_000000" / "state.json").write_text("0")
        (storage.local / "results.csv").write_text("a\n1\n")
    assert stored(client, name) == [SYNC_FILE, "results.csv", "trials/t1/checkpoint_000000/state.json"]
    long_ago = time.time() - 60
    os.utime(storage.local / "results.csv", (long_ago, long_ago))

    # Tune and Train delete old checkpoints: the next push deletes them on S3 too, and uploads
    # only what changed (a file S3 has and that did not change is not sent again).
    client.put_object(Bucket=name, Key="runs/exp/results.csv", Body=b"edited on S3")
    with mirrored(storage):
        (storage.local / "trials" / "t1" / "checkpoint_000000" / "state.json").unlink()
        (storage.local / "trials" / "t1" / "checkpoint_000001").mkdir()
        (storage.local / "trials" / "t1" / "checkpoint_000001" / "state.json").write_text("1")
    assert stored(client, name) == [SYNC_FILE, "results.csv", "trials/t1/checkpoint_000001/state.json"]
    assert client.get_object(Bucket=name, Key="runs/exp/results.csv")["Body"].read() == b"edited on S3"

    # Another machine (its own staging root) continues the search from S3's copy.
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "there"))
    there = experiment_storage(search_run(name, endpoint))
    with mirrored(there):
        assert (there.local / "trials" / "t1" / "checkpoint_000001" / "state.json").read_text() == "1"
        assert (there.local / "results.csv").read_text() == "edited on S3"
        (there.local / "results.csv").write_text("from there")
    # Back here: S3 holds the newer push, so this copy is replaced by it.
    with mirrored(storage):
        assert (storage.local / "results.csv").read_text() == "from there"
        (storage.local / "best.yaml").write_text("x")
    # A search killed here before its push: the local copy is the newer one and is kept.
    (storage.local / "results.csv").write_text("progress not yet pushed")
    with mirrored(storage):
        assert (storage.local / "results.csv").read_text() == "progress not yet pushed"
    assert client.get_object(Bucket=name, Key="runs/exp/results.csv")["Body"].read() == b"progress not yet pushed"

    with mirrored(storage, fresh=True):
        assert not storage.local.exists()
        assert stored(client, name) == []


def test_a_running_search_is_uploaded_while_it_runs(bucket, tmp_path, monkeypatch):  # noqa: F811
    endpoint, name, client = bucket
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "here"))
    storage = experiment_storage(search_run(name, endpoint))
    # As the search runs it: Tune's fit, and so the pushes during it, without AWS variables in
    # the environment (the S3 server here takes the keys the fixture set).
    with mirrored(storage, push_every_s=0.2), no_credentials_in_trial_env():
        assert not any(os.environ.get(name) for name in TRIAL_CREDENTIALS)
        (storage.local / "trials" / "t1").mkdir(parents=True)
        (storage.local / "trials" / "t1" / "result.json").write_text("{}")
        # On S3 before the block ends, with a stamp another machine would pull it by. The
        # stamp is written after the files, so wait for both (a push may be between them).
        deadline = time.time() + 20
        while stored(client, name) != [SYNC_FILE, "trials/t1/result.json"] and time.time() < deadline:
            time.sleep(0.1)
        assert stored(client, name) == [SYNC_FILE, "trials/t1/result.json"]
        during = float(client.get_object(Bucket=name, Key=f"runs/exp/{SYNC_FILE}")["Body"].read())
        (storage.local / "trials" / "t1" / "result.json").unlink()
        (storage.local / "results.csv").write_text("a\n1\n")
    # The push at the end prunes what was deleted here and stamps a later time.
    assert stored(client, name) == [SYNC_FILE, "results.csv"]
    assert float(client.get_object(Bucket=name, Key=f"runs/exp/{SYNC_FILE}")["Body"].read()) > during


def test_local_storage_is_the_experiment_directory_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = parse_config({"name": "r", "storage": "runs", "data": {"source": "d.csv", "label": "y", "output": "p"},
                        "tune": {"space": {"train.optimizer.lr": {"dist": "uniform", "low": 0.001, "high": 0.01}}}},
                       "test")
    storage = experiment_storage(run)
    assert storage.local == tmp_path / "runs" / "r-tune" and storage.uri == str(storage.local)
    with mirrored(storage, fresh=True):
        pass
    assert not (storage.local / SYNC_FILE).exists() and staging_notice(storage, 4) is None


def test_a_multi_node_search_on_s3_says_where_it_is_staged(bucket, tmp_path, monkeypatch):  # noqa: F811
    endpoint, name, _ = bucket
    monkeypatch.setenv(STAGING_ENV, str(tmp_path))
    storage = experiment_storage(search_run(name, endpoint))
    assert staging_notice(storage, 1) is None
    notice = staging_notice(storage, 3)
    assert str(storage.local) in notice and "other 2 node(s)" in notice and STAGING_ENV in notice


def test_an_unknown_bucket_is_refused_before_anything_is_written(s3_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv(STAGING_ENV, str(tmp_path))
    storage = experiment_storage(search_run("no-such-bucket-stoker-t", s3_server))
    with pytest.raises(UserError, match="^storage: bucket 'no-such-bucket-stoker-t' does not exist"):
        with mirrored(storage):
            pytest.fail("the block ran")
    assert list(tmp_path.iterdir()) == []


def test_trial_actors_get_no_aws_credentials_in_their_runtime_env(monkeypatch):
    # Tune's own list: an upgrade that renames it fails in stoker.ray_internals.
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} <= set(TRIAL_CREDENTIALS)
    for variable in TRIAL_CREDENTIALS:
        monkeypatch.setenv(variable, f"secret-{variable}")

    def trainable(config):
        return config

    leaked = _ActorClassCache().get(trainable)._default_options["runtime_env"]["env_vars"]
    assert "secret-AWS_SECRET_ACCESS_KEY" in leaked.values()  # what Tune does on its own
    with no_credentials_in_trial_env():
        env = _ActorClassCache().get(trainable)._default_options["runtime_env"]["env_vars"]
        assert "AWS_ACCESS_KEY_ID" not in os.environ
    assert not any(value.startswith("secret-") for value in env.values()), env
    assert env.get("PL_DISABLE_FORK") == "1"  # the rest of Tune's environment still goes
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "secret-AWS_SECRET_ACCESS_KEY"  # put back after


def test_a_pointer_written_elsewhere_names_the_run_under_this_experiment(tmp_path):
    # A search continued on another machine (or moved): its pointers carry the old absolute
    # path; the trial must continue its own run here, not seed a new one from a missing path.
    import json

    from ray.tune import Checkpoint

    from stoker.tune.checkpoints import POINTER, train_run_name

    pointer_dir = tmp_path / "pointer"
    pointer_dir.mkdir()
    elsewhere = "/elsewhere/staging/bucket/runs/exp/trials"
    (pointer_dir / POINTER).write_text(json.dumps({"path": f"{elsewhere}/t1.2/checkpoint_x", "run_dir": f"{elsewhere}/t1.2",
                                                   "epoch": 3}))
    trials = tmp_path / "exp" / "trials"
    assert train_run_name("t1", trials, Checkpoint.from_directory(str(pointer_dir))) == "t1.2"
    assert not trials.exists()  # nothing seeded
