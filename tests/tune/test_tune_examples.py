"""Every shipped tune example runs with the commands its header gives, as typed: from a copy of
the repository's layout, relative paths, default flags (tiny epochs and trials). And a search
whose trials all fail says why and exits non-zero."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from stoker.config import load_config
from tests.conftest import REPO, write_config

pytestmark = pytest.mark.slow

EXAMPLES = sorted((REPO / "examples").glob("tune-*.yaml"))


def header_commands(example) -> list[str]:
    """The `stoker ...` commands quoted in the example's leading comment, in order."""
    header = []
    for line in example.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    return re.findall(r"`(stoker [^`]+)`", " ".join(header))


def stoker(cwd, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "stoker", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_tune_example_runs_with_the_commands_its_header_gives(example, tmp_path):
    commands = header_commands(example)
    assert commands and commands[-1] == f"stoker tune examples/{example.name}", commands
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    # The same file, shrunk: 2 trials of 2 epochs. Everything else (relative paths included)
    # stays as shipped.
    raw = yaml.safe_load(example.read_text())
    raw["train"]["epochs"] = 2
    raw["tune"]["num_samples"] = 2
    write_config(tmp_path / "examples", raw, example.name)
    for command in commands:
        done = stoker(tmp_path, *shlex.split(command)[1:])
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    output = done.stdout + done.stderr
    # Optuna warns on every run when a choice holds values it cannot store (lists).
    assert "categorical distribution" not in output, output
    assert "failed" not in output, output
    run = load_config(tmp_path / "examples" / example.name)
    experiment = tmp_path / run.storage / run.tune.name
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 2 and set(table["status"]) <= {"completed", "stopped"}, table
    assert table[table.columns[table.columns.str.startswith("val_")][0]].notna().all(), table
    # Points to evaluate run first with their values; what they leave out is drawn inside the space.
    for index, point in enumerate(run.tune.points_to_evaluate):
        row = table.iloc[index]
        for path, value in point.items():
            cell = yaml.safe_load(row[path]) if isinstance(value, list) else row[path]
            assert cell == pytest.approx(value), (path, row[path])
    for path, dist in run.tune.space.items():
        if getattr(dist, "low", None) is not None:
            assert table[path].between(dist.low, dist.high).all(), (path, table[path])
    assert (experiment / "best.yaml").exists() and (experiment / "report.html").exists()


def failing_search(prepared, tmp_path, model_path: str):
    tune = {"num_samples": 2, "max_concurrent_trials": 1, "searcher": "random", "seed": 0,
            "space": {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-3, "high": 0.05}}}
    raw = dict(prepared, name="failing", storage=str(tmp_path / "runs"),
               train={**prepared["train"], "epochs": 1, "batch_size": 128, "deepspeed": {"zero_stage": 1}},
               model={"name": "custom", "path": model_path},
               scaling={"num_workers": 1, "cpus_per_worker": 0.25, "data_cpus": 1}, tune=tune)
    return write_config(tmp_path, raw)


def test_a_search_whose_trials_all_fail_on_bad_input_exits_2_naming_the_error(prepared, tmp_path):
    # The model is built in each trial, so every trial fails on the same user error.
    done = stoker(REPO, "tune", str(failing_search(prepared, tmp_path, "no_such_module:build")))
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"stoker: error: all 2 trials failed; the first, \w+: model.path: cannot import "
                    r"'no_such_module'", last), done.stderr


def test_a_search_whose_trials_all_crash_exits_1(prepared, tmp_path):
    # json.loads(spec) raises TypeError: a crash, not bad input the user can read about.
    done = stoker(REPO, "tune", str(failing_search(prepared, tmp_path, "json:loads")))
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"stoker: all 2 trials failed; the first, \w+: TypeError: ", last), done.stderr
