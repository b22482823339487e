"""What a search records of each ended trial (stoker.tune.recording), without Ray: the Train
run its last checkpoint belongs to, and the best epoch of its metrics.jsonl by the search's
metric, on an equal value the lower validation loss; a recording that fails is said in one line
and does not stop the search."""

import json
from pathlib import Path
from types import SimpleNamespace

from stoker.tune.recording import RecordTrials, best_fields, trial_run_dir


def a_trial_run(directory: Path, epochs: list[dict]) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text("name: t\n")
    (directory / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    return directory


def test_the_best_epoch_by_the_searchs_metric_and_the_lower_loss_on_a_tie(tmp_path):
    run = a_trial_run(tmp_path / "t1", [
        {"epoch": 0, "val_accuracy": 0.8, "val_loss": 0.5, "checkpoint": "/c/checkpoint_0"},
        {"epoch": 1, "val_accuracy": 0.9, "val_loss": 0.4, "checkpoint": "/c/checkpoint_1"},
        {"epoch": 2, "val_accuracy": 0.9, "val_loss": 0.3},
        {"epoch": 3, "val_accuracy": float("nan"), "val_loss": 0.1},
    ])
    assert best_fields(run, "val_accuracy", "max") == {
        "metric": "val_accuracy", "best_epoch": 2, "score": 0.9, "checkpoint": None,
        "metrics": {"validation": {"accuracy": 0.9, "loss": 0.3}}}
    assert best_fields(run, "val_loss", "min")["best_epoch"] == 3
    assert best_fields(run, "val_rmse", "min") == {}


def test_a_trial_is_recorded_from_its_last_checkpoints_run_and_a_failed_recording_is_said(tmp_path):
    trials = tmp_path / "trials"
    a_trial_run(trials / "abc_00000.1", [{"epoch": 0, "val_accuracy": 0.7, "val_loss": 0.6}])
    seeded = SimpleNamespace(trial_id="abc_00000", path=str(tmp_path / "abc_00000"),
                             last_result={"checkpoint_path": str(trials / "abc_00000.1" / "checkpoint_0")})
    assert trial_run_dir(trials, seeded) == trials / "abc_00000.1"
    recorded, said = [], []
    recorder = RecordTrials(trials, "val_accuracy", "max", lambda *args: recorded.append(args), said.append)
    recorder.on_trial_complete(1, [], seeded)
    recorder.on_trial_error(1, [], SimpleNamespace(trial_id="abc_00001", path="p", last_result={}))  # no run: none
    assert [(run_dir.name, status, fields["score"], fields["error"]) for run_dir, status, fields in recorded] == [
        ("abc_00000.1", "succeeded", 0.7, None)]

    def down(*args):
        raise RuntimeError("registry x is unavailable: server closed the connection\nmore")

    RecordTrials(trials, "val_accuracy", "max", down, said.append).on_trial_error(1, [], seeded)
    assert said == ["stoker: warning: trial abc_00000 not recorded in the registry: "
                    "registry x is unavailable: server closed the connection"]
