"""The tune section: search-space validation, Ray domains, concurrency and experiment identity.
Fast: no Ray cluster."""

import optuna
import pytest
from ray.tune.schedulers import (
    AsyncHyperBandScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
)
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.bayesopt import BayesOptSearch
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, Integer

from stoker.cli import main
from stoker.config import load_config, parse_config
from stoker.errors import UserError
from stoker.tune import hyperband as hyperband_module
from stoker.tune import runner
from stoker.tune.algorithms import build_scheduler, build_searcher
from stoker.tune.hyperband import ResumableBOHB
from stoker.tune.space import (
    check_space,
    nested_points,
    param_space,
    resolve_metric,
    sampled_values,
)
from tests.conftest import REPO, run_config, write_config
from tests.tune.conftest import SCHEMA

SPACE = {
    "train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.1},
    "model.hidden": {"dist": "choice", "values": [[16], [32, 16]]},
    "train.batch_size": {"dist": "int", "low": 16, "high": 64},
}


def config(tmp_path, **tune):
    raw = run_config(tmp_path / "d.csv", tmp_path / "prepared", tmp_path / "runs",
                     tune={"space": dict(SPACE), **tune})
    return raw


def parsed(tmp_path, **tune):
    run = parse_config(config(tmp_path, **tune), "run.yaml")
    base = run.model_dump(mode="json")
    base["tune"] = None
    return run, base


@pytest.mark.parametrize("tune, key", [
    ({"space": {"train.optimizer.lr": {"dist": "uniform", "low": 0.1, "high": 0.01}}}, "tune.space.train.optimizer.lr"),
    ({"space": {"train.optimizer.lr": {"dist": "loguniform", "low": 0, "high": 0.01}}}, "tune.space.train.optimizer.lr"),
    ({"space": {"model.dropout": {"dist": "normal", "low": 0, "high": 1}}}, "tune.space.model.dropout"),
    ({"searcher": "hyperopt-ish"}, "tune.searcher"),
    ({"scheduler": "fastest"}, "tune.scheduler.name"),
    ({"num_samples": 0}, "tune.num_samples"),
])
def test_bad_tune_section_names_the_key(tmp_path, tune, key):
    raw = config(tmp_path)
    raw["tune"].update(tune)
    with pytest.raises(UserError) as info:
        parse_config(raw, "run.yaml")
    message = str(info.value)
    # A distribution's own errors also name it (`tune.space.train.optimizer.lr.uniform: ...`).
    assert message.split(":")[0] in (key, *(f"{key}.{d}" for d in ("uniform", "loguniform"))), message
    assert "\n" not in message
    assert "run.yaml" in message


@pytest.mark.parametrize("space, searcher, expected", [
    ({"train.optimizer.lrr": {"dist": "uniform", "low": 0, "high": 1}}, "random",
     "tune.space.train.optimizer.lrr: names no config field (train.optimizer has: name, lr"),
    ({"train.epochs.x": {"dist": "uniform", "low": 0, "high": 1}}, "random", "tune.space.train.epochs.x: train.epochs has no sub-fields"),
    ({"name": {"dist": "choice", "values": ["a"]}}, "random", "tune.space.name: names no config field"),
    ({"model.dropout": {"dist": "uniform", "low": 0, "high": 1.5}}, "random", "tune.space.model.dropout: value 1.5 is rejected"),
    ({"model.hidden": {"dist": "grid", "values": [[8], [8]]}}, "tpe", "tune.space.model.hidden: grid values need searcher random or grid"),
    ({"model.hidden": {"dist": "choice", "values": [[8], [16]]}}, "bayesopt", "tune.space.model.hidden: bayesopt models continuous"),
    ({"train.optimizer.lr": {"dist": "uniform", "low": 0.1, "high": 0.2}}, "grid", "tune.space.train.optimizer.lr: the grid searcher needs"),
])
def test_space_paths_and_values_are_checked_before_any_trial(tmp_path, space, searcher, expected):
    run, base = parsed(tmp_path, space=space, searcher=searcher)
    with pytest.raises(UserError) as info:
        check_space(base, run.tune, SCHEMA)
    assert str(info.value).startswith(expected), str(info.value)


def test_points_to_evaluate_must_name_space_paths(tmp_path):
    run, base = parsed(tmp_path, points_to_evaluate=[{"train.epochs": 3}])
    with pytest.raises(UserError, match=r"^tune.points_to_evaluate\[0\].train.epochs: not a path in tune.space"):
        check_space(base, run.tune, SCHEMA)


def test_metric_must_be_one_the_trainer_reports(tmp_path):
    run, _ = parsed(tmp_path, metric="val_bleu")
    with pytest.raises(UserError, match=r"^tune.metric: 'val_bleu' is never reported for classification"):
        resolve_metric(run.tune, "classification", None)
    assert resolve_metric(parsed(tmp_path)[0].tune, "classification", None) == ("val_accuracy", "max")
    assert resolve_metric(parsed(tmp_path, metric="val_loss")[0].tune, "classification", None) == ("val_loss", "min")
    assert resolve_metric(parsed(tmp_path, metric="val_loss", mode="max")[0].tune, "classification", None)[1] == "max"


def test_space_becomes_nested_ray_domains_and_trial_values_come_back_by_path(tmp_path):
    run, base = parsed(tmp_path, points_to_evaluate=[{"train.optimizer.lr": 0.003}])
    check_space(base, run.tune, SCHEMA)
    space = param_space(run.tune)
    assert isinstance(space["train"]["optimizer"]["lr"], Float)
    assert isinstance(space["model"]["hidden"], Categorical)
    batch = space["train"]["batch_size"]
    assert isinstance(batch, Integer) and (batch.lower, batch.upper) == (16, 65)  # upper exclusive
    values = sampled_values({"train": {"optimizer": {"lr": 0.01}, "batch_size": 20}, "model": {"hidden": [16]}}, run.tune)
    assert values == {"train.optimizer.lr": 0.01, "train.batch_size": 20, "model.hidden": [16]}
    # Paths a point leaves out are the searcher's to draw (random and grid draw them).
    assert nested_points(run.tune) == [{"train": {"optimizer": {"lr": 0.003}}}]
    # bayesopt proposes floats for int parameters: they are rounded back.
    bo, _ = parsed(tmp_path, searcher="bayesopt", space={"train.batch_size": SPACE["train.batch_size"]})
    assert isinstance(param_space(bo.tune)["train"]["batch_size"], Float)
    assert sampled_values({"train": {"batch_size": 31.6}}, bo.tune) == {"train.batch_size": 32}


@pytest.mark.parametrize("searcher, expected", [
    ("random", BasicVariantGenerator), ("tpe", OptunaSearch), ("bayesopt", BayesOptSearch), ("bohb", ResumableBOHB)])
def test_each_searcher_maps_to_its_ray_class_seeded(tmp_path, searcher, expected):
    space = SPACE if searcher != "bayesopt" else {"train.optimizer.lr": SPACE["train.optimizer.lr"]}
    run, _ = parsed(tmp_path, searcher=searcher, space=space, seed=7)
    built = build_searcher(run.tune, nested_points(run.tune), max_concurrent=3)
    assert type(built) is expected
    if searcher == "random":
        # Tune ignores TuneConfig.max_concurrent_trials for this searcher: it must carry it,
        # and Tune is not handed it as well (it would only warn that it ignores it).
        assert built.max_concurrent == 3 and runner._concurrency_for_tune(built, 3) is None
    else:
        assert runner._concurrency_for_tune(built, 3) == 3  # Tune wraps it in its ConcurrencyLimiter
    if searcher == "tpe":
        assert type(built._sampler) is optuna.samplers.TPESampler
    if searcher == "bayesopt":
        assert built._random_state == 7


def test_each_scheduler_maps_to_its_ray_class_with_the_configs_settings(tmp_path):
    def scheduler(**options):
        run, _ = parsed(tmp_path, scheduler=options, space=SPACE)
        return build_scheduler(run.tune, epochs=9)

    assert type(scheduler(name="fifo")) is FIFOScheduler
    asha = scheduler(name="asha", grace_period=2, reduction_factor=3)
    assert type(asha) is AsyncHyperBandScheduler and asha._time_attr == "training_iteration"
    # Rungs at 2 and 6 epochs of at most 9 (max_t defaults to train.epochs).
    assert asha._max_t == 9 and [rung for rung, _ in asha._brackets[0]._rungs] == [6, 2]
    assert scheduler(name="asha", max_t=4)._max_t == 4
    hyperband = scheduler(name="hyperband", reduction_factor=2)
    assert type(hyperband) is hyperband_module.HyperBandScheduler
    assert hyperband._eta == 2 and hyperband._max_t_attr == 9
    median = scheduler(name="median", grace_period=3, min_samples_required=5)
    assert type(median) is MedianStoppingRule and (median._grace_period, median._min_samples_required) == (3, 5)
    pbt = scheduler(name="pbt", perturbation_interval=2, quantile_fraction=0.5, resample_probability=0.1)
    assert type(pbt) is hyperband_module.DonorKeepingPBT and isinstance(pbt, PopulationBasedTraining)
    assert (pbt._perturbation_interval, pbt._quantile_fraction, pbt._resample_probability) == (2, 0.5, 0.1)
    assert set(pbt._hyperparam_mutations) == {"train", "model"}
    run, _ = parsed(tmp_path, scheduler="pbt", searcher="tpe")
    with pytest.raises(UserError, match="^tune.searcher: pbt draws its own population"):
        build_scheduler(run.tune, epochs=3)


def test_concurrency_is_capped_by_cpus_left_for_data_and_trial_resources(tmp_path):
    run, base = parsed(tmp_path)
    base["scaling"] = {"num_workers": 1, "cpus_per_worker": 0.25, "data_cpus": 1}
    cluster = {"CPU": 2.0}
    footprint = runner.trial_footprint(base, run.tune, cluster, SCHEMA)
    assert footprint == (0.25, 0.0)
    # 1 CPU left after Ray Data's; each trial takes 0.25 + the 0.01 driver: 3 fit, not 4.
    assert runner.concurrency(None, 100, footprint, cluster, 1) == 3
    assert runner.concurrency(2, 100, footprint, cluster, 1) == 2
    assert runner.concurrency(8, 1, footprint, cluster, 1) == 1
    assert runner.concurrency(None, 100, (1.0, 1.0), {"CPU": 16, "GPU": 2}, 1) == 2


def test_trials_larger_than_the_cluster_are_refused(tmp_path):
    run, base = parsed(tmp_path)
    base["scaling"] = {"num_workers": 4, "cpus_per_worker": 1, "data_cpus": 1}
    with pytest.raises(UserError, match=r"^scaling.cpus_per_worker: 4 workers x 1 CPUs"):
        runner.trial_footprint(base, run.tune, {"CPU": 2.0}, SCHEMA)
    # The largest value of a scaling field in the space counts.
    run, base = parsed(tmp_path, space={"scaling.num_workers": {"dist": "choice", "values": [1, 8]}})
    base["scaling"]["cpus_per_worker"] = 0.5
    with pytest.raises(UserError, match=r"^scaling.cpus_per_worker: 8 workers"):
        runner.trial_footprint(base, run.tune, {"CPU": 4.0}, SCHEMA)


def test_resume_refuses_a_missing_or_different_experiment(tmp_path):
    run, base = parsed(tmp_path, name="exp")
    plan = runner.SearchPlan(run, base, "val_accuracy", "max", tmp_path / "runs" / "exp", 2, 2)
    with pytest.raises(UserError, match=r"^tune.name: no experiment 'exp' to resume"):
        runner.open_experiment(plan, resume=True, fresh=False)
    assert runner.open_experiment(plan, resume=False, fresh=False) is False
    assert (plan.path / runner.STATE_FILE).exists()
    # The same search again: accepted (nothing for Tune to restore yet, so it starts over).
    assert runner.open_experiment(plan, resume=True, fresh=False) is False
    other = config(tmp_path, name="exp")
    other["tune"]["space"] = {**SPACE, "model.dropout": {"dist": "uniform", "low": 0, "high": 0.5}}
    changed = runner.SearchPlan(parse_config(other, "run.yaml"), base, "val_accuracy", "max", plan.path, 2, 2)
    with pytest.raises(UserError, match=r"^tune.space: differs from the one experiment 'exp' was started with"):
        runner.open_experiment(changed, resume=True, fresh=False)
    assert runner.open_experiment(changed, resume=False, fresh=True) is False
    # Writing out a default value is the same search; changing a training value is not.
    runner.open_experiment(plan, resume=False, fresh=True)
    same = config(tmp_path, name="exp")
    same["train"]["seed"] = 0
    assert runner.open_experiment(runner.SearchPlan(parse_config(same, "run.yaml"), base, "val_accuracy", "max",
                                              plan.path, 2, 2), resume=True, fresh=False) is False
    other = config(tmp_path, name="exp")
    other["train"]["batch_size"] = 64
    with pytest.raises(UserError, match=r"^base config: differs"):
        runner.open_experiment(runner.SearchPlan(parse_config(other, "run.yaml"), base, "val_accuracy", "max",
                                           plan.path, 2, 2), resume=True, fresh=False)


def test_cli_bad_search_space_exits_2_with_one_line(tmp_path, capsys):
    raw = config(tmp_path)
    raw["tune"]["space"] = {"train.optimizer.lr": {"dist": "loguniform", "low": -1, "high": 0.1}}
    path = write_config(tmp_path, raw)
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stoker: error: tune.space.train.optimizer.lr.loguniform: ") and "low > 0" in err and "\n" not in err


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("tune-*.yaml")), ids=lambda p: p.name)
def test_shipped_tune_examples_are_valid_searches(example):
    run = load_config(example)
    base = run.model_dump(mode="json")
    base["tune"] = None
    check_space(base, run.tune, SCHEMA)
    assert param_space(run.tune)


def test_single_worker_searches_run_in_process_unless_told_or_searching_workers(tmp_path):
    from stoker.tune.trial import runs_in_process

    def run_with(num_workers, space_extra=None, **tune):
        raw = config(tmp_path, **tune)
        raw["scaling"] = {"num_workers": num_workers}
        raw["tune"]["space"].update(space_extra or {})
        return parse_config(raw, "run.yaml")

    assert runs_in_process(run_with(1), run_with(1).tune)
    assert not runs_in_process(run_with(2), run_with(2).tune)
    off = run_with(1, in_process=False)
    assert not runs_in_process(off, off.tune)
    # A searched worker count may give some trials several workers: all use a TorchTrainer.
    searched = run_with(1, {"scaling.num_workers": {"dist": "choice", "values": [1, 2]}})
    assert not runs_in_process(searched, searched.tune)


def test_synchronous_pbt_is_passed_to_tune(tmp_path):
    run, _ = parsed(tmp_path, scheduler={"name": "pbt", "synch": True})
    assert build_scheduler(run.tune, epochs=3)._synch is True
    run, _ = parsed(tmp_path, scheduler="pbt")
    assert build_scheduler(run.tune, epochs=3)._synch is False


@pytest.mark.parametrize("searcher", ["random", "tpe", "bohb"])
@pytest.mark.parametrize("point, expected", [
    # The shipped example's crash: weight_decay 0.0 under a loguniform from 1e-6.
    ({"train.optimizer.lr": 0.0}, "tune.points_to_evaluate[1].train.optimizer.lr: 0.0 lies outside "
                                  "tune.space.train.optimizer.lr (loguniform 0.0001..0.1)"),
    ({"model.hidden": [64]}, "tune.points_to_evaluate[1].model.hidden: [64] lies outside tune.space.model.hidden "
                             "(choice of [[16], [32, 16]])"),
    ({"train.batch_size": 20.5}, "tune.points_to_evaluate[1].train.batch_size: 20.5 lies outside"),
    ({"train.epochs": 3}, "tune.points_to_evaluate[1].train.epochs: not a path in tune.space (it has: "
                          "train.optimizer.lr, model.hidden, train.batch_size)"),
])
def test_points_to_evaluate_outside_the_space_are_refused_naming_point_and_key(tmp_path, searcher, point, expected):
    run, base = parsed(tmp_path, searcher=searcher, points_to_evaluate=[{"train.batch_size": 16}, point])
    with pytest.raises(UserError) as info:
        check_space(base, run.tune, SCHEMA)
    assert str(info.value).startswith(expected), str(info.value)


def test_cli_point_outside_the_space_exits_2_before_ray_starts(tmp_path, capsys):
    import ray

    raw = config(tmp_path, searcher="tpe", points_to_evaluate=[{"train.optimizer.lr": 0.5}])
    # In the full suite the session's shared cluster may already be up in this process: what
    # matters is that the command itself connects to none.
    connected_before = ray.is_initialized()
    # No prepared dataset either: the point is refused first, without a cluster start.
    assert main(["tune", str(write_config(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stoker: error: tune.points_to_evaluate[0].train.optimizer.lr: 0.5 lies outside"), err
    assert "\n" not in err and ray.is_initialized() == connected_before


def test_left_out_paths_are_drawn_from_the_space_not_the_base_config(tmp_path):
    point = {"train.optimizer.lr": 0.003}
    # random and grid draw what a point leaves out themselves.
    run, _ = parsed(tmp_path, searcher="random", points_to_evaluate=[point])
    assert nested_points(run.tune) == [{"train": {"optimizer": {"lr": 0.003}}}]
    # Ray's TPE, BOHB and bayesopt wrappers need whole points: drawn here, inside the space,
    # the same for a seed.
    run, base = parsed(tmp_path, searcher="tpe", points_to_evaluate=[point] * 8)
    check_space(base, run.tune, SCHEMA)
    points = nested_points(run.tune)
    assert points == nested_points(run.tune)
    drawn = [sampled_values(p, run.tune) for p in points]
    assert all(v["train.optimizer.lr"] == 0.003 for v in drawn)
    assert all(v["model.hidden"] in ([16], [32, 16]) and 16 <= v["train.batch_size"] <= 64 for v in drawn)
    assert all(type(v["train.batch_size"]) is int for v in drawn)
    # Not the base config's [64] (outside the space), and not one value for every point.
    assert len({str(v["model.hidden"]) for v in drawn}) == 2 and len({v["train.batch_size"] for v in drawn}) > 1


def test_list_valued_choices_reach_optuna_as_storable_values(tmp_path, recwarn):
    import warnings

    run, base = parsed(tmp_path, searcher="tpe", points_to_evaluate=[{"model.hidden": [32, 16]}])
    check_space(base, run.tune, SCHEMA)
    hidden = param_space(run.tune)["model"]["hidden"]
    assert isinstance(hidden, Categorical) and hidden.categories == ["[16]", "[32, 16]"]
    searcher = build_searcher(run.tune, nested_points(run.tune))
    searcher.set_search_properties("val_accuracy", "max", param_space(run.tune))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns (UserWarning) on a choice it cannot store
        configs = [searcher.suggest(f"t{i}") for i in range(4)]
    values = [sampled_values(c, run.tune) for c in configs]
    assert values[0]["model.hidden"] == [32, 16]
    assert all(v["model.hidden"] in ([16], [32, 16]) for v in values)
    # A grid of lists and a choice mixing strings and lists round-trip too.
    mixed, _ = parsed(tmp_path, searcher="random", space={"model.hidden": {"dist": "grid", "values": [[8], [16]]},
                                                          "train.optimizer.name": {"dist": "choice", "values": ["adam", "sgd"]}})
    assert param_space(mixed.tune)["train"]["optimizer"]["name"].categories == ["adam", "sgd"]
    assert sampled_values({"model": {"hidden": "[8]"}, "train": {"optimizer": {"name": "sgd"}}}, mixed.tune) == {
        "model.hidden": [8], "train.optimizer.name": "sgd"}


def test_relative_paths_are_made_absolute_once_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = config(tmp_path)
    raw.update(storage="runs")
    raw["data"].update(source=["data/a.csv", "s3://bucket/b.csv"], output="prepared/x")
    base = runner.absolute_paths(parse_config(raw, "run.yaml").model_dump(mode="json"))
    assert base["storage"] == str(tmp_path / "runs") and base["data"]["output"] == str(tmp_path / "prepared/x")
    assert base["data"]["source"] == [str(tmp_path / "data/a.csv"), "s3://bucket/b.csv"]
    raw["data"].update(source="s3://bucket/b.csv", output="s3://bucket/prepared")
    base = runner.absolute_paths(parse_config(raw, "run.yaml").model_dump(mode="json"))
    assert (base["data"]["source"], base["data"]["output"]) == ("s3://bucket/b.csv", "s3://bucket/prepared")


def test_failed_trials_are_counted_and_the_first_named(tmp_path):
    import pandas as pd

    def outcome(failures, trials):
        return runner.SearchOutcome(tmp_path, "val_accuracy", "max", pd.DataFrame({"trial": trials}), None, None,
                                    False, [], failures)

    bad = runner.TrialFailure("t1", str(tmp_path / "t1"), "model.path: cannot import 'x'", True)
    crash = runner.TrialFailure("t2", str(tmp_path / "t2"), "TypeError: boom", False)
    assert outcome([], ["t1", "t2"]).failure_summary() is None
    code, line = outcome([bad], ["t0", "t1", "t2"]).failure_summary()
    assert code == 0 and line.startswith("1 of 3 trials failed; the first, t1: model.path: cannot import 'x'")
    assert outcome([bad, crash], ["t1", "t2"]).failure_summary() == (
        2, "all 2 trials failed; the first, t1: model.path: cannot import 'x'")
    assert outcome([crash, bad], ["t2", "t1"]).failure_summary()[0] == 1
