"""Multi-objective searches (tune.metrics): config validation, the searcher and scheduler Tune
gets, the Pareto front of a results table and `--pick`. Fast: no Ray cluster."""

import numpy as np
import optuna
import pytest
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from stoker.config import parse_config
from stoker.errors import UserError
from stoker.tune import findings
from stoker.tune.algorithms import build_scheduler, build_searcher
from stoker.tune.objectives import (
    FRONT,
    PARETO,
    check_objectives,
    mark_front,
    non_dominated,
    objectives_of,
    picked_row,
    searcher_objectives,
    single_metric_scheduler,
)
from stoker.tune.space import param_space
from tests.conftest import run_config
from tests.tune.synthetic import SPACE, result, table_of, tune_config

TWO = [{"name": "val_accuracy", "mode": "max"}, {"name": "time_total_s"}]


def raw_config(tmp_path, **tune):
    return run_config(tmp_path / "d.csv", tmp_path / "prepared", tmp_path / "runs",
                      tune={"space": dict(SPACE), "searcher": "tpe", **tune})


@pytest.mark.parametrize("tune, key, words", [
    ({"metrics": [{"name": "val_accuracy", "mode": "median"}, {"name": "time_total_s"}]},
     "tune.metrics.0.mode", "'min' or 'max'"),
    ({"metrics": [{"name": "val_accuracy"}]}, "tune.metrics", "at least 2"),
    ({"metrics": TWO, "metric": "val_loss"}, "tune.metrics", "not both"),
    ({"metrics": [*TWO, {"name": "val_accuracy"}]}, "tune.metrics", "val_accuracy is listed twice"),
    ({"metrics": TWO, "searcher": "bayesopt"}, "tune.metrics", "searcher bayesopt optimises one metric"),
    ({"metrics": [{"name": "val_accuracy", "goal": "max"}, {"name": "time_total_s"}]},
     "tune.metrics.0.goal", "unknown key"),
])
def test_bad_metrics_are_refused_naming_the_key(tmp_path, tune, key, words):
    with pytest.raises(UserError) as info:
        parse_config(raw_config(tmp_path, **tune), "run.yaml")
    message = str(info.value)
    assert message.startswith(f"{key}:") and words in message and "run.yaml" in message, message
    assert "\n" not in message


def test_a_metric_the_trainer_never_reports_is_refused_and_modes_default_by_metric():
    tune_cfg = tune_config(metrics=[{"name": "val_accuracy"}, {"name": "val_mse"}])
    with pytest.raises(UserError, match=r"^tune.metrics\[1\].name: 'val_mse' is never reported for classification; "
                                        r"choose from .*val_f1.*time_total_s"):
        check_objectives(tune_cfg, "classification", None)
    tune_cfg = tune_config(metrics=[{"name": "val_accuracy"}, {"name": "time_total_s"}, {"name": "samples_per_s"},
                                    {"name": "val_loss"}, {"name": "best_val_f1"}])
    modes = [(o.name, o.mode) for o in check_objectives(tune_cfg, "classification", "f1")]
    assert modes == [("val_accuracy", "max"), ("time_total_s", "min"), ("samples_per_s", "max"),
                     ("val_loss", "min"), ("best_val_f1", "max")]


def test_the_searcher_gets_every_objective_and_the_scheduler_the_first():
    tune_cfg = tune_config(metrics=TWO)
    objectives = objectives_of(tune_cfg)
    searcher = build_searcher(tune_cfg, [], 2, searcher_objectives(objectives))
    assert type(searcher) is OptunaSearch and type(searcher._sampler) is optuna.samplers.TPESampler
    # What Tune does with it: wraps it and hands it the space, with no metric of its own.
    limited = ConcurrencyLimiter(searcher, max_concurrent=2)
    assert limited.set_search_properties(None, None, param_space(tune_cfg))
    assert searcher.metric == ["val_accuracy", "time_total_s"]
    suggestion = searcher.suggest("a")
    assert set(suggestion) == {"train", "model"}
    searcher.on_trial_complete("a", {"val_accuracy": 0.9, "time_total_s": 3.0})
    # Optuna's study holds both objectives, with their directions.
    study = searcher._ot_study  # the one assertion that looks inside Ray's wrapper
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.trials[0].values == [0.9, 3.0]

    scheduler = single_metric_scheduler(build_scheduler(tune_config(metrics=TWO, scheduler="asha"), 3), objectives)
    assert type(scheduler) is ASHAScheduler and scheduler._time_attr == "training_iteration" and scheduler._max_t == 3
    assert scheduler.metric == "val_accuracy" and scheduler._metric_op == 1.0  # max
    # Tune's own call with no metric leaves the scheduler's.
    assert scheduler.set_search_properties(None, None) and scheduler.metric == "val_accuracy"


def test_non_dominated_keeps_exactly_the_trade_offs():
    # Minimise both: (1, 5), (2, 2), (5, 1) trade off; (3, 3) and (2, 4) are beaten; a
    # duplicate of a front point stays on it.
    points = np.array([[1, 5], [3, 3], [2, 2], [5, 1], [2, 4], [2, 2]], dtype=float)
    assert non_dominated(points).tolist() == [True, False, True, True, False, True]


def front_search():
    tune_cfg = tune_config(metrics=TWO)
    values = {"train.optimizer.lr": 0.003, "train.optimizer.weight_decay": 0.0, "model.hidden": [16],
              "train.batch_size": 16}
    scores = [(0.90, 10.0), (0.95, 20.0), (0.80, 5.0), (0.85, 15.0), (0.97, 40.0), (0.99, 1.0)]
    results = [result(f"t{i}", tune_cfg, dict(values, **{"train.batch_size": 16 + i}),
                      {"val_accuracy": acc, "time_total_s": time}, error=i == 5)
               for i, (acc, time) in enumerate(scores)]
    return tune_cfg, results


def test_the_front_marks_trade_offs_from_last_results_and_orders_picks_by_the_first_metric():
    tune_cfg, results = front_search()
    objectives = objectives_of(tune_cfg)
    table = mark_front(table_of(results, tune_cfg, "val_accuracy", "max"), results, objectives)
    assert list(table[PARETO]) == [True, True, True, False, True, False]  # t5 errored, however good
    assert table[FRONT].astype(object).where(table[FRONT].notna(), None).tolist() == [2, 1, 3, None, 0, None]
    assert picked_row(table, objectives, 0)["trial"] == "t4"
    assert picked_row(table, objectives, 3)["trial"] == "t2"
    with pytest.raises(UserError, match=r"^--pick: 4 is out of range; the Pareto front has 4 trade-offs \(0..3\)$"):
        picked_row(table, objectives, 4)
    with pytest.raises(UserError, match="out of range"):
        picked_row(table, objectives, -1)


def test_pick_writes_best_yaml_for_that_trade_off(tmp_path):
    tune_cfg, results = front_search()
    found = findings.add_findings(results, table_of(results, tune_cfg, "val_accuracy", "max"), tune_cfg,
                                  "val_accuracy", "max", tmp_path)
    found.table.to_parquet(tmp_path / "results.parquet")
    # As check_search hands it over: the whole run config, defaults included.
    base = parse_config(run_config(tmp_path / "d.csv", tmp_path / "prepared", tmp_path / "runs"), "t").model_dump(mode="json")
    path, line = findings.pick_tradeoff(base, tune_cfg, tmp_path, 3)
    text = path.read_text()
    assert text.startswith(f"# trade-off 3 of the Pareto front of search {tmp_path.name}: trial t2, "
                           "val_accuracy 0.8, time_total_s 5 after 2 epochs\n"), text
    assert "train.batch_size" not in text and "batch_size: 18" in text, text
    assert line == "trade-off 3: trial t2, val_accuracy 0.8, time_total_s 5"
    assert any("Pareto front" in s and "plots/pareto_front.png" in s for s in found.sections)
    assert (tmp_path / "plots" / "pareto_front.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match=r"^--pick: 9 is out of range"):
        findings.pick_tradeoff(base, tune_cfg, tmp_path, 9)
    with pytest.raises(UserError, match=r"^--pick: only for a multi-objective search"):
        findings.pick_tradeoff(base, tune_config(), tmp_path, 0)
    with pytest.raises(UserError, match=r"^--pick: no finished search at"):
        findings.pick_tradeoff(base, tune_cfg, tmp_path / "nowhere", 0)


def test_cli_refuses_an_unreported_metric_a_bad_warm_start_and_a_pick_without_results_with_exit_2(
        prepared, tmp_path, capsys):
    from stoker.cli import main
    from tests.conftest import write_config

    def tune_cli(*args, **tune):
        raw = dict(prepared, name="mo", storage=str(tmp_path / "runs"),
                   tune={"space": {"train.optimizer.lr": SPACE["train.optimizer.lr"]}, "searcher": "tpe", **tune})
        code = main(["tune", str(write_config(tmp_path, raw)), *args])
        return code, capsys.readouterr().err.strip()

    code, err = tune_cli(metrics=[{"name": "val_accuracy"}, {"name": "model_size"}])
    assert code == 2 and err.startswith("stoker: error: tune.metrics[1].name: 'model_size' is never reported "
                                        "for classification; choose from train_loss, val_loss, val_accuracy"), err
    code, err = tune_cli(warm_start=str(tmp_path))
    assert code == 2 and err == f"stoker: error: tune.warm_start[0]: {tmp_path} is not a stoker tune experiment " \
                                "(no stoker_experiment.json)", err
    code, err = tune_cli("--pick", "0", metrics=TWO)
    assert code == 2 and err.startswith("stoker: error: --pick: no finished search at "), err
    assert "\n" not in err
