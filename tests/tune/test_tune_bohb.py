"""The bohb searcher: Ray's TuneBOHB (hpbandster + ConfigSpace) paired with HyperBandForBOHB.

Unit tests drive the real searcher directly (no Ray cluster); the slow test runs `stoker tune`
with it on the digits data."""

import sys

import ConfigSpace
import pytest
from ray.tune import schedulers
from ray.tune.search.bohb import TuneBOHB
from ray.tune.utils import flatten_dict

from stoker.cli import main
from stoker.config import load_config, parse_config
from stoker.errors import UserError
from stoker.tune import hyperband
from stoker.tune.algorithms import build_scheduler, build_searcher
from stoker.tune.space import check_space, nested_points, param_space, sampled_values
from tests.conftest import run_config, write_config
from tests.tune.conftest import SCHEMA

SPACE = {
    "train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.1},
    "model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.5},
    "train.batch_size": {"dist": "int", "low": 16, "high": 64},
    "model.hidden": {"dist": "choice", "values": [[16], [32, 16]]},
    "train.deepspeed.bf16": {"dist": "choice", "values": [True, False]},
}


def parsed(tmp_path, **tune):
    raw = run_config(tmp_path / "d.csv", tmp_path / "prepared", tmp_path / "runs",
                     tune={"space": SPACE, "searcher": "bohb", **tune})
    run = parse_config(raw, "run.yaml")
    base = run.model_dump(mode="json")
    base["tune"] = None
    return run, base


def test_bohb_runs_with_hyperband_which_is_its_default(tmp_path):
    run, _ = parsed(tmp_path)
    assert run.tune.scheduler.name == "hyperband"
    assert type(build_scheduler(run.tune, epochs=9)) is hyperband.HyperBandForBOHB
    # Options without a name keep the pairing; the scheduler gets them.
    run, _ = parsed(tmp_path, scheduler={"reduction_factor": 2, "max_t": 4})
    scheduler = build_scheduler(run.tune, epochs=9)
    assert type(scheduler) is hyperband.HyperBandForBOHB and scheduler._eta == 2 and scheduler._max_t_attr == 4
    # Other searchers keep Ray's plain HyperBand.
    run, _ = parsed(tmp_path, searcher="tpe", scheduler="hyperband")
    plain = build_scheduler(run.tune, epochs=9)
    assert type(plain) is hyperband.HyperBandScheduler and not isinstance(plain, schedulers.HyperBandForBOHB)
    for other in ("asha", "fifo", "median", "pbt"):
        with pytest.raises(UserError) as info:
            parsed(tmp_path, scheduler=other)
        assert str(info.value) == (f"tune.scheduler.name: searcher bohb needs scheduler hyperband "
                                   f"(or no scheduler.name), got {other} (run.yaml)")


def test_cli_bohb_with_another_scheduler_exits_2_naming_the_key(tmp_path, capsys):
    raw = run_config(tmp_path / "d.csv", tmp_path / "prepared", tmp_path / "runs",
                     tune={"space": SPACE, "searcher": "bohb", "scheduler": {"name": "asha"}})
    assert main(["tune", str(write_config(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stoker: error: tune.scheduler.name: searcher bohb needs scheduler hyperband"), err
    assert "\n" not in err


@pytest.mark.parametrize("tune, expected", [
    ({"space": {"model.hidden": {"dist": "grid", "values": [[8], [16]]}}},
     "tune.space.model.hidden: grid values need searcher random or grid; use dist: choice with bohb"),
    ({"points_to_evaluate": [{"train.optimizer.lr": 0.5}]},
     "tune.points_to_evaluate[0].train.optimizer.lr: 0.5 lies outside tune.space.train.optimizer.lr"),
    ({"points_to_evaluate": [{"model.hidden": [64]}]},
     "tune.points_to_evaluate[0].model.hidden: [64] lies outside tune.space.model.hidden"),
    ({"points_to_evaluate": [{"train.batch_size": 128, "model.hidden": [16]}]},
     "tune.points_to_evaluate[0].train.batch_size: 128 lies outside tune.space.train.batch_size"),
])
def test_bohb_refuses_grids_and_points_outside_the_space_before_any_trial(tmp_path, tune, expected):
    run, base = parsed(tmp_path, **tune)
    with pytest.raises(UserError) as info:
        check_space(base, run.tune, SCHEMA)
    assert str(info.value).startswith(expected), str(info.value)


def test_space_maps_to_configspace_hyperparameters(tmp_path):
    space = {**SPACE, "model.hidden": {"dist": "choice", "values": [[16], [32, 16]]},
             "train.epochs": {"dist": "int", "low": 2, "high": 32, "log": True}}
    run, base = parsed(tmp_path, space=space)
    check_space(base, run.tune, SCHEMA)
    searcher = build_searcher(run.tune, [])
    assert type(searcher) is hyperband.ResumableBOHB and isinstance(searcher, TuneBOHB)
    searcher.set_search_properties("val_accuracy", "max", param_space(run.tune))
    params = dict(searcher._space)
    lr = params["train/optimizer/lr"]
    assert isinstance(lr, ConfigSpace.UniformFloatHyperparameter) and lr.log and (lr.lower, lr.upper) == (1e-4, 0.1)
    dropout = params["model/dropout"]
    assert isinstance(dropout, ConfigSpace.UniformFloatHyperparameter) and not dropout.log
    batch = params["train/batch_size"]
    # Both ends included, as in the config (Ray's randint upper bound is exclusive).
    assert isinstance(batch, ConfigSpace.UniformIntegerHyperparameter) and (batch.lower, batch.upper) == (16, 64)
    epochs = params["train/epochs"]
    assert isinstance(epochs, ConfigSpace.UniformIntegerHyperparameter) and epochs.log and epochs.upper == 32
    assert isinstance(params["model/hidden"], ConfigSpace.CategoricalHyperparameter)
    # Lists go through the searchers as JSON text (Optuna cannot store a list choice).
    assert list(params["model/hidden"].choices) == ["[16]", "[32, 16]"]


def drive(searcher, trials: int) -> list[dict]:
    """Ask for `trials` configs, answering each with a deterministic score at a HyperBand budget
    (what HyperBandForBOHB adds to results), so BOHB's model takes over after the first few."""
    configs = []
    for index in range(trials):
        trial_id = f"t{index}"
        config = searcher.suggest(trial_id)
        configs.append(config)
        score = -abs(config["train"]["optimizer"]["lr"] - 0.01) - config["model"]["dropout"] / 10
        result = {"val_accuracy": score, "hyperband_info": {"budget": 1.0}}
        searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)
    return configs


def test_same_seed_and_space_give_the_same_trial_configs(tmp_path):
    def run_search(seed):
        run, _ = parsed(tmp_path, seed=seed)
        searcher = build_searcher(run.tune, [])
        searcher.set_search_properties("val_accuracy", "max", param_space(run.tune))
        return run, searcher, drive(searcher, 16)

    run, searcher, first = run_search(seed=7)
    # Past the random start the kernel density model proposed configs too: they are covered.
    assert list(searcher.bohber.kde_models) == [1.0]
    _, _, again = run_search(seed=7)
    assert again == first
    _, _, other = run_search(seed=8)
    assert other != first
    # Every value a trial sees is a plain Python value inside the space (BOHB's model picks
    # come back as NumPy scalars; the trial's config fields refuse np.True_).
    for config in first:
        values = sampled_values(config, run.tune)
        assert type(values["train.deepspeed.bf16"]) is bool and type(values["train.batch_size"]) is int
        assert 16 <= values["train.batch_size"] <= 64 and 1e-4 <= values["train.optimizer.lr"] <= 0.1
        assert values["model.hidden"] in ([16], [32, 16])


def test_points_to_evaluate_are_tried_first_and_learnt_from(tmp_path):
    point = {"train.optimizer.lr": 0.003, "model.hidden": [32, 16], "train.batch_size": 48}
    run, base = parsed(tmp_path, points_to_evaluate=[point])
    check_space(base, run.tune, SCHEMA)
    searcher = build_searcher(run.tune, nested_points(run.tune))
    searcher.set_search_properties("val_accuracy", "max", param_space(run.tune))
    configs = drive(searcher, 10)
    # Paths the point leaves out are drawn from the space (the base config's may lie outside it).
    first = sampled_values(configs[0], run.tune)
    assert {k: first[k] for k in point} == point
    assert 0.0 <= first["model.dropout"] <= 0.5 and first["train.deepspeed.bf16"] in (True, False)
    assert sampled_values(configs[1], run.tune) != sampled_values(configs[0], run.tune)
    # Its result went into BOHB's observations for that budget (ten in all).
    assert len(searcher.bohber.configs[1.0]) == 10


def test_a_restored_searcher_keeps_what_it_learnt(tmp_path):
    # What `stoker tune --resume` relies on: Tune saves the searcher with the experiment state.
    run, _ = parsed(tmp_path, seed=3)
    searcher = build_searcher(run.tune, [])
    searcher.set_search_properties("val_accuracy", "max", param_space(run.tune))
    drive(searcher, 12)
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = TuneBOHB()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert [list(c) for c in restored.bohber.configs[1.0]] == [list(c) for c in searcher.bohber.configs[1.0]]
    assert list(restored.bohber.kde_models) == [1.0]
    assert restored.metric == "val_accuracy" and restored.mode == "max"
    # It goes on proposing configs inside the space from its model.
    config = restored.suggest("after")
    assert 16 <= config["train"]["batch_size"] <= 64


def test_a_trial_resumed_after_the_searcher_closed_it_is_learnt_from(tmp_path):
    # `--resume` continues errored trials, whose parameters Ray's TuneBOHB dropped when they
    # errored: their next result used to raise KeyError and end the search.
    run, _ = parsed(tmp_path)
    searcher = build_searcher(run.tune, [])
    searcher.set_search_properties("val_accuracy", "max", param_space(run.tune))
    config = searcher.suggest("errored")
    searcher.on_trial_complete("errored", error=True)
    result = {f"config/{path}": value for path, value in flatten_dict(config, delimiter="/").items()}
    result.update({"val_accuracy": 0.5, "hyperband_info": {"budget": 1.0}})
    searcher.on_trial_result("errored", result)
    searcher.on_trial_complete("errored", result)
    observed = searcher.bohber.configs[1.0]
    assert len(observed) == 1 and searcher.bohber.losses[1.0] == [-0.5]


def test_missing_packages_exit_2_with_the_install_hint(tmp_path, monkeypatch):
    run, _ = parsed(tmp_path)
    monkeypatch.setitem(sys.modules, "hpbandster", None)  # what an install without the extra sees
    with pytest.raises(UserError, match=r"^tune.searcher: bohb needs the hpbandster and ConfigSpace "
                                        r"packages \(pip install -e '\.\[bohb\]'\)$"):
        build_searcher(run.tune, [])


@pytest.mark.slow
def test_stoker_tune_with_bohb_stops_trials_at_hyperband_rungs(ray_cluster, prepared, tmp_path, capsys):
    from tests.tune.test_tune_e2e import small

    tune = {"num_samples": 4, "max_concurrent_trials": 2, "searcher": "bohb", "seed": 1,
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.05}},
            "points_to_evaluate": [{"train.optimizer.lr": 0.01}]}
    path = write_config(tmp_path, small(prepared, tmp_path, "bohb", tune, epochs=3))
    assert main(["tune", str(path), "--status-every", "5"]) == 0
    out = capsys.readouterr().out
    assert "searcher bohb, scheduler hyperband" in out, out
    experiment = tmp_path / "runs" / "bohb-tune"
    import pandas as pd

    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 4, table
    # max_t 3, reduction factor 3: the first bracket starts 3 trials at 1 epoch and carries one
    # on to 3; the second runs its one trial for all 3. So two trials stop after one epoch.
    assert sorted(table["epochs"]) == [1, 1, 3, 3], table
    assert list(table["status"]).count("stopped") == 2, table
    assert table.loc[0, "train.optimizer.lr"] == pytest.approx(0.01)
    # The bracket's survivor paused at its rung and resumed from its checkpoint: every epoch of
    # its Train run was trained once.
    for trial in table.loc[table["epochs"] == 3, "trial"]:
        logged = (experiment / "trials" / trial / "metrics.jsonl").read_text().splitlines()
        assert len(logged) == 3, logged
    best = load_config(experiment / "best.yaml")
    assert best.tune is None and best.name == "bohb-tune-best"
    best_row = table.loc[table["val_accuracy"].idxmax()]
    assert best.train.optimizer.lr == pytest.approx(best_row["train.optimizer.lr"])
    assert (experiment / "results.parquet").exists() and (experiment / "report.html").exists()

    # Resuming the finished search trains nothing again: trials HyperBand stopped while they
    # were paused at their rung stay stopped (Ray 2.60 saved them as PAUSED and resumed them).
    assert main(["tune", str(path), "--resume"]) == 0
    again = pd.read_csv(experiment / "results.csv")
    # (Tune lists restored trials in its own order, so compare by trial.)
    assert dict(zip(again["trial"], again["epochs"], strict=True)) == dict(zip(table["trial"], table["epochs"], strict=True))
    for trial, epochs in zip(table["trial"], table["epochs"], strict=True):
        assert len((experiment / "trials" / trial / "metrics.jsonl").read_text().splitlines()) == epochs


@pytest.mark.slow
@pytest.mark.timeout(600)  # a resumed HyperBand used to wait forever on a trial paused at max_t
def test_killed_bohb_search_resumes_without_retraining_or_hanging(ray_cluster, prepared, tmp_path, monkeypatch):
    import json
    import os
    import signal
    import time

    import pandas as pd

    from tests.tune.conftest import read_until, start_tune
    from tests.tune.test_tune_e2e import small

    tune = {"num_samples": 5, "max_concurrent_trials": 2, "searcher": "bohb", "seed": 1,
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.05}}}
    path = write_config(tmp_path, small(prepared, tmp_path, "killed", tune, epochs=3))
    # The driver snapshots the experiment at every step (Tune's default is at most every 10 s).
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    driver = start_tune(path)
    try:
        # Killed once a bracket has stopped trials at its first rung, with others unfinished.
        seen = read_until(driver, " after ")
        time.sleep(2)  # a step or two: the stops are in the snapshot
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(30)
    finished = {line.split()[1] for line in seen if " after " in line}
    assert finished, "".join(seen[-30:])
    experiment = tmp_path / "runs" / "killed-tune"
    logged_before = {t: (experiment / "trials" / t / "metrics.jsonl").read_text() for t in finished}

    assert main(["tune", str(path), "--resume"]) == 0
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 5 and set(table["status"]) <= {"completed", "stopped"}, table
    assert finished <= set(table["trial"])
    for trial, epochs in zip(table["trial"], table["epochs"], strict=True):
        logged = [json.loads(line)["epoch"] for line in
                  (experiment / "trials" / trial / "metrics.jsonl").read_text().splitlines()]
        # Each epoch trained once: unfinished trials continued from their checkpoints.
        assert logged == list(range(epochs)), (trial, logged)
    # Trials that had finished (stopped at a rung or done) before the kill were not run again.
    for trial, text in logged_before.items():
        assert (experiment / "trials" / trial / "metrics.jsonl").read_text() == text
