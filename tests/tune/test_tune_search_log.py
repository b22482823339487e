"""The search's trial log, written by the real callback from Tune-shaped trials, and replayed
into the Optuna study that `stoker dashboard` serves."""

import json
import time
from types import SimpleNamespace

import optuna
import pandas as pd
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from stoker.tune.config import TuneConfig
from stoker.tune.search_log import LOG_FILE, LiveStudy, SearchLog, events

SPACE = {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.1},
         "model.hidden": {"dist": "choice", "values": [[16], [32, 16]]}}


def _trial(tid: str, lr: float, hidden: list[int], last: dict | None = None):
    # What the callback reads of a Tune Trial: its id, its nested config (a choice of lists
    # as the JSON text the searcher saw) and its last result.
    return SimpleNamespace(trial_id=tid, config={"train": {"optimizer": {"lr": lr}}, "model": {"hidden": json.dumps(hidden)}},
                           last_result=last or {})


def _log(tmp_path, scheduler="asha") -> SearchLog:
    cfg = TuneConfig.model_validate({"space": SPACE, "searcher": "tpe", "scheduler": {"name": scheduler}})
    log = SearchLog(tmp_path, cfg, "val_accuracy", "max", max_epochs=3)
    log.setup()
    return log


def _trials(live: LiveStudy) -> dict[str, optuna.trial.FrozenTrial]:
    return {t.user_attrs["tune_trial"]: t for t in live.storage.get_all_trials(live.study_id)}


def test_a_replayed_search_has_each_trial_with_its_parameters_curve_and_how_it_ended(tmp_path):
    log = _log(tmp_path)
    done, stopped, failed = _trial("a", 0.01, [32, 16]), _trial("b", 0.001, [16]), _trial("c", 0.05, [16])
    for trial in (done, stopped, failed):
        log.on_trial_start(0, [], trial)
    for epoch, value in ((1, 0.5), (2, 0.7), (3, 0.9)):
        log.on_trial_result(0, [], done, {"training_iteration": epoch, "val_accuracy": value})
    log.on_trial_result(0, [], stopped, {"training_iteration": 1, "val_accuracy": 0.2})
    log.on_trial_result(0, [], stopped, {"training_iteration": 1, "loss": 3.0})  # without the metric: no point
    done.last_result = {"training_iteration": 3, "val_accuracy": 0.9}
    stopped.last_result = {"training_iteration": 1, "val_accuracy": 0.2}
    log.on_trial_complete(0, [], done)
    log.on_trial_complete(0, [], stopped)
    log.on_trial_error(0, [], failed)

    live = LiveStudy(InMemoryStorage(), tmp_path / LOG_FILE)
    assert live.refresh() == 11
    study = optuna.load_study(study_name=tmp_path.name, storage=live.storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and study.metric_names == ["val_accuracy"]
    trials = _trials(live)
    assert trials["a"].state == TrialState.COMPLETE and trials["a"].value == 0.9
    assert trials["a"].intermediate_values == {1: 0.5, 2: 0.7, 3: 0.9}
    assert trials["a"].params == {"train.optimizer.lr": 0.01, "model.hidden": "[32, 16]"}
    assert trials["b"].state == TrialState.PRUNED and trials["b"].intermediate_values == {1: 0.2}
    assert trials["b"].user_attrs["stopped_by"] == "asha" and trials["b"].user_attrs["epochs"] == 1
    assert trials["c"].state == TrialState.FAIL and trials["c"].user_attrs["status"] == "error"
    # Each trial's own times, not the moment the log was read.
    assert trials["a"].datetime_start <= trials["a"].datetime_complete
    assert live.refresh() == 0  # nothing new: nothing applied twice


def test_the_study_follows_the_log_as_it_grows_and_waits_for_a_line_still_being_written(tmp_path):
    log = _log(tmp_path)
    trial = _trial("a", 0.01, [16])
    log.on_trial_start(0, [], trial)
    live = LiveStudy(InMemoryStorage(), tmp_path / LOG_FILE)
    live.refresh()
    assert _trials(live)["a"].state == TrialState.RUNNING
    log.on_trial_result(0, [], trial, {"training_iteration": 1, "val_accuracy": 0.4})
    path = tmp_path / LOG_FILE
    whole = path.read_bytes()
    trial.last_result = {"training_iteration": 3, "val_accuracy": 0.8}
    log.on_trial_complete(0, [], trial)
    end = path.read_bytes()[len(whole):]
    path.write_bytes(whole + end[:10])  # the end line half written
    live.refresh()
    assert _trials(live)["a"].state == TrialState.RUNNING and _trials(live)["a"].intermediate_values == {1: 0.4}
    path.write_bytes(whole + end)
    live.refresh()
    assert _trials(live)["a"].state == TrialState.COMPLETE and _trials(live)["a"].value == 0.8
    assert live.damaged == 0


def test_a_line_cut_by_a_crash_marks_its_trial_damaged_and_a_resumed_search_goes_on(tmp_path):
    log = _log(tmp_path)
    trial = _trial("a", 0.01, [16])
    log.on_trial_start(0, [], trial)
    log.on_trial_result(0, [], trial, {"training_iteration": 1, "val_accuracy": 0.4})
    path = tmp_path / LOG_FILE
    path.write_bytes(path.read_bytes()[:-12])  # the driver died inside the result's write
    resumed = _log(tmp_path)  # the resumed driver writes its header again and goes on
    trial.last_result = {"training_iteration": 3, "val_accuracy": 0.8}
    resumed.on_trial_start(0, [], trial)
    resumed.on_trial_complete(0, [], trial)
    live = LiveStudy(InMemoryStorage(), path)
    live.refresh()
    assert live.damaged == 1
    trials = _trials(live)
    assert list(trials) == ["a"]  # started again after the resume: still one trial
    assert trials["a"].user_attrs["damaged"] is True and trials["a"].state == TrialState.COMPLETE
    assert len(live.storage.get_all_studies()) == 1


def test_the_end_of_a_search_takes_each_trials_curve_from_the_log_not_from_files_per_trial(tmp_path):
    from ray.tune import Result

    from stoker.tune.report import write_report
    from stoker.tune.results import results_table
    from stoker.tune.search_log import curves_of

    log = _log(tmp_path)
    trials = [_trial("a", 0.01, [16], {"training_iteration": 3, "pid": 11, "node_ip": "10.0.0.1"}),
              _trial("b", 0.02, [16], {"training_iteration": 1, "pid": 12, "node_ip": "10.0.0.2"})]
    for trial in trials:
        log.on_trial_start(0, [], trial)
    for epoch, value in ((1, 0.5), (2, 0.9), (3, 0.7)):
        log.on_trial_result(0, [], trials[0], {"training_iteration": epoch, "val_accuracy": value})
    log.on_trial_result(0, [], trials[0], {"training_iteration": 3, "val_accuracy": 0.8})  # re-reported after a resume
    log.on_trial_result(0, [], trials[1], {"training_iteration": 1, "val_accuracy": 0.6})
    log.on_trial_complete(0, [], trials[0])
    log.on_trial_complete(0, [], trials[1])
    with (tmp_path / LOG_FILE).open("a") as handle:
        handle.write('{"event": "result", "trial": "b", "epoch": 2, "val')  # cut by a crash
    # A trial from before the log existed: its Tune results files are all it has.
    older = Result(metrics={"trial_id": "z", "training_iteration": 2}, checkpoint=None, error=None,
                   path=str(tmp_path / "z"), metrics_dataframe=pd.DataFrame({"training_iteration": [1, 2],
                                                                               "val_accuracy": [0.2, 0.3]}))
    results = [Result(metrics={"trial_id": t.trial_id, **t.last_result}, checkpoint=None, error=None,
                      path=str(tmp_path / t.trial_id), metrics_dataframe=pd.DataFrame()) for t in trials] + [older]

    curves = curves_of(results, tmp_path, "val_accuracy")

    assert curves == {"a": [(1, 0.5), (2, 0.9), (3, 0.8)], "b": [(1, 0.6)], "z": [(1, 0.2), (2, 0.3)]}
    cfg = TuneConfig.model_validate({"space": SPACE, "searcher": "tpe"})
    table = results_table(results, cfg, "val_accuracy", "max", 3, curves=curves).set_index("trial")
    assert table.loc["a", "val_accuracy"] == 0.9 and table.loc["a", "last_val_accuracy"] == 0.8
    assert table.loc["b", "val_accuracy"] == 0.6 and table.loc["b", "status"] == "stopped"
    assert table.loc["z", "val_accuracy"] == 0.3
    # Where each trial ran, for error analysis and for telling reused processes apart.
    assert [(e["trial"], e["pid"], e["node"]) for e in events(tmp_path, "end")] == [("a", 11, "10.0.0.1"),
                                                                                     ("b", 12, "10.0.0.2")]
    page = write_report(curves, table.reset_index(), "val_accuracy", "max", tmp_path).read_text()
    assert "learning_curves.png" in page and (tmp_path / "plots" / "learning_curves.png").stat().st_size > 0


def test_a_large_search_draws_the_curves_of_its_best_trials_only(tmp_path):
    from stoker.tune import report

    n = report.TOP_TRIALS + 50
    table = pd.DataFrame({"trial": [f"t{i}" for i in range(n)], "val_loss": [float(n - i) for i in range(n)],
                          "status": ["completed"] * n})
    curves = {f"t{i}": [(1, float(n - i) + 1), (2, float(n - i))] for i in range(n)}
    drawn = report.plot_learning_curves(curves, table, "val_loss", "min", tmp_path / "curves.png")
    assert sorted(drawn) == sorted(f"t{i}" for i in range(50, n))  # the lowest losses
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_trial_stopped_once_the_time_budget_is_spent_is_stopped_by_the_budget_over_a_resume(tmp_path):
    cfg = TuneConfig.model_validate({"space": SPACE, "searcher": "tpe", "scheduler": {"name": "asha"},
                                     "time_budget_s": 600})
    log = SearchLog(tmp_path, cfg, "val_accuracy", "max", max_epochs=3)
    log.setup()
    early = _trial("a", 0.01, [16], {"training_iteration": 1})
    log.on_trial_start(0, [], early)
    log.on_trial_complete(0, [], early)  # 600 s not spent: the scheduler stopped it
    # The driver snapshotted 599.9 s of search time, died, and a new one resumed it.
    resumed = SearchLog(tmp_path, cfg, "val_accuracy", "max", max_epochs=3)
    resumed.set_state({**log.get_state(), "ran_s": 599.9})
    resumed.setup()
    time.sleep(0.15)
    late = _trial("b", 0.02, [16], {"training_iteration": 2})
    resumed.on_trial_start(0, [], late)
    resumed.on_trial_complete(0, [], late)
    assert {e["trial"]: e["stopped_by"] for e in events(tmp_path, "end")} == {"a": "asha", "b": "time_budget"}
