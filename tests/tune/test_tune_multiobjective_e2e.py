"""Real multi-objective and warm-started searches: in-process DeepSpeed trials on the session's
local cluster, scored on validation accuracy against training time."""

import pandas as pd
import pytest
import yaml

from stoker.cli import main
from stoker.config import load_config, parse_config
from stoker.tune.runner import search
from tests.conftest import write_config
from tests.tune.test_tune_e2e import small

pytestmark = pytest.mark.slow

METRICS = [{"name": "val_accuracy", "mode": "max"}, {"name": "time_total_s", "mode": "min"}]
SPACE = {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.05},
         "model.hidden": {"dist": "choice", "values": [[8], [32]]}}


@pytest.fixture(scope="module")
def first_search(ray_cluster, prepared, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("multi")
    tune = {"num_samples": 4, "max_concurrent_trials": 2, "searcher": "tpe", "seed": 0, "metrics": METRICS,
            # ASHA has one metric to rank by: the first.
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}, "space": SPACE}
    raw = small(prepared, tmp_path, "multi", tune)
    lines = []
    outcome = search(parse_config(raw, "test"), emit=lines.append, status_interval_s=5)
    return outcome, write_config(tmp_path, raw), lines


def test_multi_objective_search_marks_the_front_scores_importance_and_picks_trade_offs(first_search, capsys):
    outcome, config, lines = first_search
    table = outcome.table
    assert len(table) == 4 and set(table["status"]) <= {"completed", "stopped"}, table
    assert table["last_time_total_s"].gt(0).all() and table["last_val_accuracy"].between(0, 1).all(), table
    front = table[table["pareto"]].sort_values("front")
    assert len(front) >= 1 and list(front["front"]) == list(range(len(front)))
    # No trial off the front beats a front trial on both objectives... and every trial off it
    # is beaten by one on it.
    for _, row in table[~table["pareto"]].iterrows():
        assert ((front["last_val_accuracy"] >= row["last_val_accuracy"])
                & (front["last_time_total_s"] <= row["last_time_total_s"])).any(), (row, front)
    on_disk = pd.read_parquet(outcome.path / "results.parquet")
    assert on_disk["pareto"].tolist() == table["pareto"].tolist()
    # best.yaml: the front's first trade-off (the most accurate of it).
    first = front.iloc[0]
    assert first["last_val_accuracy"] == front["last_val_accuracy"].max()
    best = outcome.best_config.read_text()
    assert best.startswith(f"# trade-off 0 of the Pareto front of search multi-tune: trial {first['trial']}, ")
    assert load_config(outcome.best_config).train.optimizer.lr == pytest.approx(first["train.optimizer.lr"])
    importance = pd.read_csv(outcome.path / "importance.csv")
    assert set(importance["parameter"]) == set(SPACE)
    assert list(importance.columns) == ["parameter", "val_accuracy", "time_total_s"]
    page = outcome.report.read_text()
    assert 'src="plots/pareto_front.png"' in page and 'src="plots/importance.png"' in page
    # --pick: another trade-off, without running anything; out of range: exit 2, one line.
    last = len(front) - 1
    assert main(["tune", str(config), "--pick", str(last)]) == 0
    assert f"trade-off {last}: trial {front.iloc[last]['trial']}" in capsys.readouterr().out
    assert yaml.safe_load(outcome.best_config.read_text())["train"]["optimizer"]["lr"] == pytest.approx(
        front.iloc[last]["train.optimizer.lr"])
    assert main(["tune", str(config), "--pick", str(len(front))]) == 2
    assert capsys.readouterr().err.strip() == (f"stoker: error: --pick: {len(front)} is out of range; the Pareto "
                                               f"front has {len(front)} trade-off{'' if len(front) == 1 else 's'} "
                                               f"(0..{last})")


def test_a_warm_started_search_takes_the_earlier_trials_first(first_search, prepared, tmp_path):
    outcome, _, _ = first_search
    tune = {"num_samples": 2, "max_concurrent_trials": 2, "searcher": "tpe", "seed": 1, "metrics": METRICS,
            "space": SPACE, "warm_start": str(outcome.path)}
    lines = []
    second = search(parse_config(small(prepared, tmp_path, "warm", tune, epochs=1), "test"),
                    emit=lines.append, status_interval_s=5)
    assert f"warm start: 4 earlier trials taken (4 from {outcome.path})" in lines, lines
    assert len(second.table) == 2 and set(second.table["status"]) == {"completed"}, second.table
