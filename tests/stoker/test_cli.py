"""The CLI as a user runs it: a real `python -m stoker` subprocess, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_config, write_config


def stoker(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "stoker", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=120
    )


def test_version_and_schema():
    from stoker import __version__

    assert stoker("--version").stdout.strip() == f"stoker {__version__}"
    schema = json.loads(stoker("config", "schema").stdout)
    assert set(schema["properties"]) == {"name", "storage", "data", "model", "train", "scaling", "tune", "cluster"}


def test_help_lists_only_working_commands():
    out = stoker("--help").stdout
    section = out.split("positional arguments:")[1].split("options:")[0]
    # Command lines are indented four spaces; their help text follows the name.
    # (a wrapped help text continues on a deeper-indented line, which is not a command).
    listed = [line.split()[0] for line in section.splitlines() if line.startswith("    ") and line[4:5].strip()]
    assert listed == ["data", "train", "export", "evaluate", "config", "k8s", "submit", "jobs", "runs", "models", "monitor", "tune",
                      "dashboard"]


def test_bad_config_exits_2_with_one_line_and_debug_shows_the_traceback(tmp_path):
    config = run_config(tmp_path / "x.csv", tmp_path / "out", tmp_path / "runs")
    config["train"]["deepspeed"]["zero_stage"] = 5
    path = write_config(tmp_path, config)
    plain = stoker("train", str(path))
    assert plain.returncode == 2
    assert plain.stderr == "stoker: error: train.deepspeed.zero_stage: must be 0..3, got 5 (run.yaml)\n"
    debug = stoker("--debug", "train", str(path))
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    # Anywhere on the command line, as users type it after a failure.
    late = stoker("train", str(path), "--debug")
    assert late.returncode == 2 and "Traceback" in late.stderr and late.stderr.endswith(plain.stderr)


def test_the_declared_python_floor_is_the_tested_version():
    """requires-python claims only what the suite runs on: its floor is the interpreter the
    Makefile builds the environment with, and the one running these tests satisfies it."""
    import re
    import tomllib

    from packaging.specifiers import SpecifierSet

    declared = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    tested = re.search(r"^PYTHON \?= python(3\.\d+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    floor = min(s.version for s in declared if s.operator == ">=")
    assert floor == tested
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in declared
    assert "3.10" not in declared  # datetime.UTC and the CLI's imports need 3.11


@pytest.mark.parametrize(
    ("csv", "change", "expected"),
    [
        (None, {}, "data.source: {dir}/in.csv: no such file or directory"),
        ("a,b,target\n1,2,0\n3,4\n", {}, "{dir}/in.csv: row 2 (line 3): CSV parse error: Expected 3 columns, got 2"),
        ("a,b,c\n1,2,0\n", {}, "data.label: column 'target' is not in {dir}/in.csv"),
        ("a,target\n1,0\n", {"split": {"train": 0.5, "validation": 0.3, "test": 0.3}},
         "data.split: train + validation + test must sum to 1, got 1.1 (run.yaml)"),
        ("a,target\n1,0\n", {"colour": "red"}, "data.colour: unknown key (run.yaml)"),
    ],
    ids=["missing-file", "ragged-row", "no-label-column", "split-sum", "unknown-key"],
)
def test_data_prepare_bad_input(tmp_path, csv, change, expected):
    if csv is not None:
        (tmp_path / "in.csv").write_text(csv)
    config = run_config(tmp_path / "in.csv", tmp_path / "out", tmp_path / "runs")
    config["data"].update(change)
    result = stoker("data", "prepare", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    assert result.stderr.startswith("stoker: error: " + expected.format(dir=tmp_path)), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"run.yaml", "in.csv"} & {p.name for p in tmp_path.iterdir()})


def test_train_without_prepared_data_says_what_to_run(tmp_path):
    config = run_config(tmp_path / "in.csv", tmp_path / "nothing", tmp_path / "runs")
    result = stoker("train", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    assert "run `stoker data prepare CONFIG` first" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_sample_and_prepare_digits(tmp_path):
    csv = tmp_path / "digits.csv"
    assert stoker("data", "sample", "digits", str(csv)).returncode == 0
    config = run_config(csv, tmp_path / "prepared", tmp_path / "runs")
    result = stoker("data", "prepare", str(write_config(tmp_path, config)))
    assert result.returncode == 0, result.stderr
    assert "train 1258, validation 270, test 269 rows; 64 features; 10 classes" in result.stdout
    assert (tmp_path / "prepared" / "manifest.json").exists()
