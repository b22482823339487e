"""MLflow tracking against a real local MLflow store (SQLite in the run directory)."""

import pickle

import pytest

from stoker.errors import UserError
from stoker.trainer.tracking import MlflowLog, redact

mlflow = pytest.importorskip("mlflow")


def history(log, key):
    return [(m.step, m.value) for m in mlflow.MlflowClient(log.uri).get_metric_history(log.run_id, key)]


def test_params_once_metrics_per_epoch_and_restarts_log_nothing_twice(tmp_path):
    params = {"train.optimizer.lr": 0.003, "model.name": "mlp"}
    log = MlflowLog(tmp_path, None, "run-a", params)
    assert log.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    log.log({"epoch": 0, "val_loss": 1.5, "lr": 0.003, "early_stopped": True, "step_validations": []})
    log.log({"epoch": 1, "val_loss": 1.0, "lr": 0.003})

    # A restarted driver (Ray pickles the callback into its controller; a resumed run builds a
    # new one): the same MLflow run, and epochs it already has are not logged again.
    again = pickle.loads(pickle.dumps(MlflowLog(tmp_path, None, "run-a", {"train.optimizer.lr": 0.01})))
    assert again.run_id == log.run_id
    again.log({"epoch": 1, "val_loss": 0.9, "lr": 0.003})
    again.log({"epoch": 2, "val_loss": 0.8, "lr": 0.003})
    assert history(again, "val_loss") == [(0, 1.5), (1, 1.0), (2, 0.8)]
    run = mlflow.MlflowClient(log.uri).get_run(log.run_id)
    assert run.data.params == {"train.optimizer.lr": "0.003", "model.name": "mlp"}
    assert "early_stopped" not in run.data.metrics and run.info.run_name == "run-a"


def test_credentials_never_become_params():
    params = redact({
        "train.tracking.mlflow_uri": "https://alice:s3cr3t@mlflow.example.com/",
        "data.s3.endpoint_url": "http://key:pw@minio:9000",
        "options.api_key": "abc", "options.aws_secret_access_key": "xyz",
        "train.optimizer.lr": 0.1, "train.checkpoint.keep": 2,
    })
    assert params == {
        "train.tracking.mlflow_uri": "https://***@mlflow.example.com/",
        "data.s3.endpoint_url": "http://***@minio:9000",
        "options.api_key": "***", "options.aws_secret_access_key": "***",
        "train.optimizer.lr": 0.1, "train.checkpoint.keep": 2,
    }


def test_unusable_tracking_uri_is_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    # MLflow 3.7+ refuses its file store unless opted in; say so with the config key.
    with pytest.raises(UserError, match=r"^train\.tracking\.mlflow_uri: .*") as info:
        MlflowLog(tmp_path, (tmp_path / "mlruns").as_uri(), "run", {})
    assert "\n" not in str(info.value)


def test_a_worker_failure_becomes_one_line_with_rank_cause_epoch_and_attempt(tmp_path, capsys):
    import json

    from stoker.trainer.run import _say_event
    from stoker.trainer.run_dir import Records
    from stoker.trainer.tracking import RunLog

    log = RunLog(Records(tmp_path), max_failures=1)
    log.after_report(None, [{"epoch": 0}], type("Checkpoint", (), {"path": "/x/checkpoint_0"})())
    log.after_exception(None, {1: RuntimeError("A worker health check failed.\nWorker info: ...")})
    log.after_exception(None, {0: RuntimeError("boom")})
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    for event in events:
        _say_event(event)
    assert capsys.readouterr().err.splitlines() == [
        "stoker: worker rank 1 failed (A worker health check failed.); restarting the workers from epoch 0's "
        "checkpoint, attempt 1 of 1 (train.max_failures)",
        "stoker: worker rank 0 failed (boom); no restarts left (train.max_failures 1)",
    ]
