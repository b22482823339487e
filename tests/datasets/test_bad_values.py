"""Bad values a new user brings: infinities, strings that mean "missing" and strings that do
not, single-class labels, files that are not UTF-8 or not Parquet; every refusal one line naming
the file, "row N (line M)" and the column, with nothing written; the manifest strict JSON."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from stoker.datasets.config import DataConfig
from stoker.datasets.prepare import prepare
from stoker.errors import UserError


def cfg(source, output, **extra) -> DataConfig:
    extra.setdefault("label", "target")
    return DataConfig(source=str(source), output=str(output), **extra)


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def refused(config: DataConfig) -> str:
    with pytest.raises(UserError) as info:
        prepare(config)
    message = str(info.value)
    assert "\n" not in message and "<Buffer>" not in message
    assert not __import__("pathlib").Path(config.output).exists()
    return message


def numbers_csv(path, overrides: dict, n=60) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=n), "y": rng.normal(size=n), "target": ["a", "b"] * (n // 2)})
    for (row, column), value in overrides.items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    frame.to_csv(path, index=False)


def test_infinity_fails_naming_file_row_line_column_or_is_dropped_and_counted(tmp_path):
    src = tmp_path / "in.csv"
    numbers_csv(src, {(4, "y"): "inf", (9, "x"): "-inf"})
    message = refused(cfg(src, tmp_path / "out"))
    # Data row 5 is line 6 of the file (the header is line 1).
    assert message.startswith(f"{src}: row 5 (line 6), column 'y': inf is not a finite number"), message

    manifest = prepare(cfg(src, tmp_path / "out", bad_values="drop", task="classification"))
    assert manifest.dropped == {"bad_value": 2}
    assert sum(s["rows"] for s in manifest.splits.values()) == 58
    for column in ("x", "y"):
        stats = manifest.transform["numeric"][column]
        assert all(np.isfinite(stats[k]) for k in ("mean", "std", "min", "max")), stats
    strict_json((tmp_path / "out" / "manifest.json").read_text())


def test_infinite_regression_label_is_a_bad_value(tmp_path):
    src = tmp_path / "reg.csv"
    frame = pd.DataFrame({"x": np.arange(40.0), "target": np.arange(40.0)})
    frame.loc[7, "target"] = np.inf
    frame.to_csv(src, index=False)
    message = refused(cfg(src, tmp_path / "out", task="regression"))
    assert message.startswith(f"{src}: row 8 (line 9), column 'target': inf is not a finite number"), message
    manifest = prepare(cfg(src, tmp_path / "out", task="regression", bad_values="drop"))
    assert manifest.dropped == {"bad_value": 1}
    strict_json((tmp_path / "out" / "manifest.json").read_text())


def test_manifest_is_strict_json_when_a_column_has_no_training_value(tmp_path):
    src = tmp_path / "in.csv"
    frame = pd.DataFrame({"x": np.arange(60.0), "empty": [np.nan] * 60, "target": ["a", "b"] * 30})
    frame.to_csv(src, index=False)
    prepare(cfg(src, tmp_path / "out", missing="mean"))
    manifest = strict_json((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["report"]["columns"]["empty"]["missing"] == manifest["splits"]["train"]["rows"]


def test_na_values_are_configurable_and_other_strings_are_bad_values(tmp_path):
    src = tmp_path / "in.csv"
    numbers_csv(src, {(2, "x"): "n/a", (3, "x"): "?", (5, "y"): "NULL"})
    # Default list: n/a and NULL are missing (dropped under `missing: drop`), "?" is not.
    message = refused(cfg(src, tmp_path / "out"))
    assert message.startswith(f"{src}: row 4 (line 5), column 'x': '?' is not a number"), message
    assert "data.na_values" in message
    manifest = prepare(cfg(src, tmp_path / "out", na_values=["?", "n/a", "NULL"]))
    assert manifest.dropped == {"missing_value": 3}
    # Without n/a in the list it is a bad value, even in a JSON lines file.
    jsonl = tmp_path / "in.jsonl"
    pd.read_csv(src, keep_default_na=False).to_json(jsonl, orient="records", lines=True)
    message = refused(cfg(jsonl, tmp_path / "out2", na_values=["?", "NULL"]))
    assert message.startswith(f"{jsonl}: row 3 (line 3), column 'x': 'n/a' is not a number"), message
    dropped = prepare(cfg(jsonl, tmp_path / "out2", na_values=["?", "NULL"], bad_values="drop"))
    assert dropped.dropped == {"bad_value": 1, "missing_value": 2}


def test_single_class_is_refused_at_prepare_time(tmp_path):
    src = tmp_path / "one.csv"
    pd.DataFrame({"x": np.arange(30.0), "target": ["only"] * 30}).to_csv(src, index=False)
    message = refused(cfg(src, tmp_path / "out"))
    assert message.startswith("data.label: column 'target' has 1 class in the training split ('only')"), message
    config = tmp_path / "run.yaml"
    config.write_text(f"name: one\ndata: {{source: {src}, label: target, output: {tmp_path / 'out'}}}\n")
    result = subprocess.run([sys.executable, "-m", "stoker", "data", "prepare", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "classification needs at least two" in result.stderr


def test_all_missing_labels_name_the_label_even_when_imputing(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"x": np.arange(10.0), "target": [np.nan] * 10}).to_csv(src, index=False)
    message = refused(cfg(src, tmp_path / "out", missing="mean"))
    assert message.startswith(f"data.label: column 'target' has no value in any row of {src}"), message
    assert "impute" not in message


def test_missing_label_column_lists_columns_with_an_ellipsis(tmp_path):
    src = tmp_path / "wide.csv"
    pd.DataFrame({f"c{i:02d}": [1.0, 2.0] for i in range(30)}).to_csv(src, index=False)
    message = refused(cfg(src, tmp_path / "out"))
    assert message.startswith(f"data.label: column 'target' is not in {src} (columns: c00, c01"), message
    assert message.endswith("c19, ... (10 more))"), message


def test_not_utf8_says_so_with_byte_and_line(tmp_path):
    src = tmp_path / "latin1.csv"
    src.write_bytes(b"x,city,target\n1,Paris,a\n2,Z\xfcrich,b\n3,Rome,a\n")
    message = refused(cfg(src, tmp_path / "out"))
    offset = src.read_bytes().index(b"\xfc")
    assert message.startswith(f"{src}: not UTF-8: byte {offset} (line 3)"), message
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"x": 1, "target": "a"}\n{"x": 2, "target": "\xe9"}\n')
    offset = jsonl.read_bytes().index(b"\xe9")
    assert refused(cfg(jsonl, tmp_path / "out")).startswith(f"{jsonl}: not UTF-8: byte {offset} (line 2)")


def test_broken_parquet_names_the_file_not_a_buffer(tmp_path):
    src = tmp_path / "broken.parquet"
    src.write_bytes(b"PAR1 not really parquet")
    message = refused(cfg(src, tmp_path / "out"))
    assert message.startswith(f"{src}: "), message


def test_inspect_shows_every_column_with_missing_counts_and_no_balance_for_regression(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({f"f{i:02d}": rng.normal(size=100) for i in range(25)})
    frame["colour"] = rng.choice(["red", "blue"], 100)
    frame.loc[:9, "f24"] = np.nan
    frame["target"] = rng.normal(size=100)
    frame.to_csv(tmp_path / "wide.csv", index=False)
    prepare(cfg(tmp_path / "wide.csv", tmp_path / "out", task="regression", missing="mean"))
    result = subprocess.run([sys.executable, "-m", "stoker", "data", "inspect", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for column in [*(f"f{i:02d}" for i in range(25)), "colour"]:
        [line] = [x for x in lines if x.strip().startswith(column + " ")]
        assert "missing " in line, line
    [f24] = [x for x in lines if x.strip().startswith("f24 ")]
    assert int(f24.split("missing ")[1]) > 0
    assert "bias report" not in result.stdout and "under-represented" not in result.stdout
