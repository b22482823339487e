"""`stoker data apply` streams: batch by batch into one Parquet writer, with the same rows and
values as encoding the whole source at once, and errors that leave nothing behind."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stoker.datasets import file_passes, images
from stoker.datasets import transform as tf
from stoker.datasets.apply import apply
from stoker.datasets.config import DataConfig, S3Config
from stoker.datasets.io import Rejects, detect_format, read_images, read_tables
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, Manifest
from stoker.datasets.prepare import prepare
from stoker.datasets.storage import list_sources
from stoker.errors import UserError


def _apply_whole(prepared: str, source: str, output) -> dict:
    """The implementation before streaming (whole source in one frame, one `write_table`),
    kept here as the reference the streaming one must reproduce."""
    manifest = Manifest.read(prepared, S3Config())
    text = manifest.transform.get("text", {})
    config = DataConfig(source=source, output=str(output), label=manifest.label, task=manifest.task,
                        text={"column": text.get("column", "text")})
    files = list_sources(config.sources, config.s3, key="input")
    rejects = Rejects(quarantine=False)
    summary = {"rows": 0, "imputed_rows": 0, "unknown_labels": 0}
    labels = None
    if manifest.modality == "image":
        _, class_names, pixels = read_images(files, config, rejects)
        columns = {FEATURES_COLUMN: tf.list_column(tf.apply_image(pixels, manifest.transform["image"]), pa.float32())}
        labels = pd.Series(class_names)
    else:
        frame = read_tables(files, detect_format(files, "auto"), config, rejects).to_pandas()
        if manifest.modality == "text":
            columns = {FEATURES_COLUMN: tf.list_column(tf.apply_text(frame[text["column"]].tolist(), text), pa.int32())}
        else:
            frame = tf.add_derived(frame, manifest.transform.get("derived", {}))
            columns = tf.apply_tabular(frame, manifest.transform)
            numeric = manifest.transform["numeric"]
            if numeric:
                gaps = np.isnan(np.column_stack([columns[c] for c in numeric]))
                summary["imputed_rows"] = int(gaps.any(axis=1).sum())
                scale = manifest.transform.get("scale", "standard")
                for column, stats in numeric.items():
                    values = columns[column]
                    if scale == "standard":
                        mean = 0.0
                    elif scale == "minmax" and stats["min"] is not None:
                        span = stats["max"] - stats["min"]
                        mean = (stats["mean"] - stats["min"]) / (span if span > 0 else 1.0)
                    else:
                        mean = stats["mean"]
                    values[np.isnan(values)] = mean
        if manifest.label and manifest.label in frame.columns:
            labels = frame[manifest.label]
    if labels is not None:
        if manifest.classes is not None:
            index = {str(c): i for i, c in enumerate(manifest.classes)}
            encoded = labels.astype("string").map(index).astype("float64").fillna(-1).to_numpy(np.int64)
            summary["unknown_labels"] = int((encoded < 0).sum())
            columns[LABEL_COLUMN] = encoded
        else:
            columns[LABEL_COLUMN] = pd.to_numeric(labels, errors="coerce").to_numpy(np.float32)
    table = pa.table(columns)
    summary["rows"] = table.num_rows
    pq.write_table(table, output)
    return summary


def _tabular_raw(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "x": rng.normal(3, 2, n).round(4),
        "y": rng.integers(-50, 50, n).astype(float),
        "colour": rng.choice(["red", "green", "blue"], n),
        "size": rng.choice(["S", "M", "L", "XL"], n),
        "target": rng.choice(["no", "yes"], n),
    })


def _new_tabular(directory, sizes=(700, 37, 260)) -> None:
    """Several CSV files of new rows, the first many batches long, with what training never
    saw: missing numbers, unknown and missing categories, unknown and missing labels."""
    directory.mkdir()
    for index, n in enumerate(sizes):
        frame = _tabular_raw(n, seed=10 + index)
        rng = np.random.default_rng(20 + index)
        frame.loc[rng.random(n) < 0.08, "x"] = np.nan
        frame.loc[rng.random(n) < 0.05, "y"] = np.nan
        frame.loc[rng.random(n) < 0.06, "colour"] = "purple"
        frame.loc[rng.random(n) < 0.04, "size"] = None
        frame.loc[rng.random(n) < 0.05, "target"] = "maybe"
        frame.loc[rng.random(n) < 0.02, "target"] = None
        frame.to_csv(directory / f"part-{index}.csv", index=False)


@pytest.mark.parametrize("options", [
    {"missing": "mean", "derived": {"xy": "x * y", "lx": "log1p(abs(x))"}},
    {"missing": "median", "scale": "minmax", "encoding": "ordinal"},
    {"missing": "drop", "missing_by_column": {"size": "mode"}, "scale": "none"},
])
def test_streamed_output_equals_the_whole_source_encoding(tmp_path, monkeypatch, options):
    _tabular_raw(600, seed=0).to_csv(tmp_path / "raw.csv", index=False)
    prepare(DataConfig(source=str(tmp_path / "raw.csv"), label="target", output=str(tmp_path / "out"), **options))
    _new_tabular(tmp_path / "new")
    expected = _apply_whole(str(tmp_path / "out"), str(tmp_path / "new"), tmp_path / "whole.parquet")

    monkeypatch.setattr(file_passes, "BATCH_ROWS", 64)  # every file is read in batches of ~64-130 rows
    summary = apply(str(tmp_path / "out"), str(tmp_path / "new"), tmp_path / "stream.parquet")

    assert summary == expected
    assert summary["rows"] == 997 and summary["unknown_labels"] > 0
    # Only a missing number training would have dropped the row for is counted as imputed.
    assert (summary["imputed_rows"] > 0) == (options["missing"] == "drop")
    streamed, whole = pq.read_table(tmp_path / "stream.parquet"), pq.read_table(tmp_path / "whole.parquet")
    assert streamed.schema == whole.schema
    assert streamed.equals(whole)  # every column, dtype, row and value, in order
    assert pq.ParquetFile(tmp_path / "stream.parquet").num_row_groups > 3


def test_text_streams_with_the_same_ids(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma"]

    def sentences(n, vocabulary):
        return [" ".join(rng.choice(vocabulary, rng.integers(1, 9))) for _ in range(n)]

    train = pd.DataFrame({"text": sentences(300, words), "target": rng.choice(["pos", "neg"], 300)})
    train.to_csv(tmp_path / "raw.csv", index=False)
    prepare(DataConfig(source=str(tmp_path / "raw.csv"), label="target", output=str(tmp_path / "out"),
                       text={"max_length": 6}))
    (tmp_path / "new").mkdir()
    for index, n in enumerate((500, 90)):
        new = pd.DataFrame({"text": sentences(n, [*words, "Unseen", "zeta!"]), "target": rng.choice(["pos", "neg", "meh"], n)})
        new.loc[new.index[3], "text"] = None
        new.to_json(tmp_path / "new" / f"part-{index}.jsonl", orient="records", lines=True)
    expected = _apply_whole(str(tmp_path / "out"), str(tmp_path / "new"), tmp_path / "whole.parquet")

    monkeypatch.setattr(file_passes, "BATCH_ROWS", 32)
    summary = apply(str(tmp_path / "out"), str(tmp_path / "new"), tmp_path / "stream.parquet")

    assert summary == expected and summary["rows"] == 590 and summary["unknown_labels"] > 0
    streamed = pq.read_table(tmp_path / "stream.parquet")
    assert streamed.equals(pq.read_table(tmp_path / "whole.parquet"))
    ids = np.stack(streamed[FEATURES_COLUMN].to_numpy(zero_copy_only=False))
    assert (ids == tf.UNKNOWN).any() and ids.shape == (590, 6)
    assert pq.ParquetFile(tmp_path / "stream.parquet").num_row_groups > 2


def test_images_are_encoded_in_chunks(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(3)
    for index, name in enumerate(["cat", "dog"]):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(14):
            pixels = np.clip(rng.normal(60 + 120 * index, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / name / f"{i}.png")
    prepare(DataConfig(source=str(tmp_path / "img"), output=str(tmp_path / "out"), image={"size": [8, 8]}))
    (tmp_path / "new" / "eel").mkdir(parents=True)  # a class training never saw
    Image.fromarray(np.full((10, 12, 3), 99, np.uint8)).save(tmp_path / "new" / "eel" / "0.png")
    for name in ("cat", "dog"):
        (tmp_path / "new" / name).mkdir()
        for i in range(4):
            (tmp_path / "new" / name / f"{i}.png").write_bytes((tmp_path / "img" / name / f"{i}.png").read_bytes())
    expected = _apply_whole(str(tmp_path / "out"), str(tmp_path / "new"), tmp_path / "whole.parquet")

    monkeypatch.setattr(images, "CHUNK_IMAGES", 3)
    summary = apply(str(tmp_path / "out"), str(tmp_path / "new"), tmp_path / "stream.parquet")

    assert summary == expected == {"rows": 9, "imputed_rows": 0, "unknown_labels": 1}
    assert pq.read_table(tmp_path / "stream.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
    assert pq.ParquetFile(tmp_path / "stream.parquet").num_row_groups == 3


@pytest.fixture
def prepared(tmp_path):
    _tabular_raw(300, seed=0).to_csv(tmp_path / "raw.csv", index=False)
    prepare(DataConfig(source=str(tmp_path / "raw.csv"), label="target", output=str(tmp_path / "out"), missing="mean"))
    return str(tmp_path / "out")


def test_a_source_of_many_batches_is_written_batch_by_batch(tmp_path, monkeypatch, prepared):
    """The encoder runs per batch: one row group per batch, never one for the whole source."""
    _tabular_raw(5000, seed=4).to_parquet(tmp_path / "new.parquet", row_group_size=5000)
    written = []
    real = pq.ParquetWriter.write_table

    def spy(self, table, *args, **kwargs):
        written.append(table.num_rows)
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", spy)
    monkeypatch.setattr(file_passes, "BATCH_ROWS", 512)
    assert apply(prepared, str(tmp_path / "new.parquet"), tmp_path / "enc.parquet")["rows"] == 5000
    assert written == [512] * 9 + [392]
    assert pq.ParquetFile(tmp_path / "enc.parquet").num_row_groups == 10


def test_a_file_that_stops_streaming_midway_is_finished_whole_without_repeating_rows(tmp_path, monkeypatch, prepared):
    # Column y reads as int64 from the first block; a later block holds "n.a." (not a
    # na_value), so the streaming reader fails there and the rest comes from a whole read.
    frame = _tabular_raw(3000, seed=5)
    frame["y"] = frame["y"].astype(int).astype(str)
    frame.loc[2500, "y"] = "n.a."
    frame.to_csv(tmp_path / "new.csv", index=False)
    monkeypatch.setattr(file_passes, "BATCH_ROWS", 64)
    expected = _apply_whole(prepared, str(tmp_path / "new.csv"), tmp_path / "whole.parquet")
    whole_reads = []
    real = file_passes.read_file
    monkeypatch.setattr(file_passes, "read_file", lambda *args: whole_reads.append(args[0].uri) or real(*args))
    summary = apply(prepared, str(tmp_path / "new.csv"), tmp_path / "stream.parquet")
    assert whole_reads == [str(tmp_path / "new.csv")]  # it did stop streaming
    assert summary == expected and summary["rows"] == 3000
    streamed = pq.read_table(tmp_path / "stream.parquet")
    assert streamed.equals(pq.read_table(tmp_path / "whole.parquet"))
    assert streamed["y"][2500].as_py() == 0.0  # "n.a." is not a number: the training mean


def test_integer_labels_keep_their_ids_in_a_batch_with_a_missing_label(tmp_path, monkeypatch):
    raw = _tabular_raw(300, seed=0)
    raw["target"] = (raw["x"] > 3).astype(int)
    raw.to_csv(tmp_path / "raw.csv", index=False)
    manifest = prepare(DataConfig(source=str(tmp_path / "raw.csv"), label="target", output=str(tmp_path / "out")))
    assert manifest.classes == [0, 1]
    new = raw.head(200).copy()
    new["target"] = new["target"].astype("Int64")
    new.loc[150, "target"] = pd.NA  # its batch reads the labels as floats
    new.loc[151, "target"] = 7  # a class training never saw
    new.to_csv(tmp_path / "new.csv", index=False)
    monkeypatch.setattr(file_passes, "BATCH_ROWS", 16)
    summary = apply(str(tmp_path / "out"), str(tmp_path / "new.csv"), tmp_path / "enc.parquet")
    labels = pq.read_table(tmp_path / "enc.parquet")["label"].to_numpy()
    expected = raw["target"].head(200).to_numpy().copy()
    expected[[150, 151]] = -1
    assert labels.tolist() == expected.tolist() and summary["unknown_labels"] == 2


def stoker(*args):
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True, timeout=120)


def test_bad_input_fails_in_one_line_naming_the_file_and_writes_nothing(tmp_path, prepared):
    (tmp_path / "new").mkdir()
    _tabular_raw(300, seed=1).to_csv(tmp_path / "new" / "a.csv", index=False)
    broken = {
        "ragged row": ("b.csv", b"x,y,colour,size,target\n1,2,red,S,no\n1,2,red\n",
                       r"b.csv: row 2 \(line 3\): CSV parse error"),
        "not UTF-8": ("b.csv", b"x,y,colour,size,target\n1,2,r\xffd,S,no\n", "b.csv: not UTF-8: byte"),
    }
    for what, (name, content, message) in broken.items():
        (tmp_path / "new" / name).write_bytes(content)
        with pytest.raises(UserError, match=message):
            apply(prepared, str(tmp_path / "new"), tmp_path / "enc.parquet")
        # a.csv was encoded and written first; the output still does not exist.
        assert not (tmp_path / "enc.parquet").exists(), what
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".enc")] == [], what

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    result = stoker("data", "apply", prepared, str(tmp_path / "bad.parquet"), str(tmp_path / "enc.parquet"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "bad.parquet" in result.stderr and not (tmp_path / "enc.parquet").exists()

    result = stoker("data", "apply", prepared, str(tmp_path / "new"), str(tmp_path / "enc.parquet"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "b.csv: not UTF-8" in result.stderr

    (tmp_path / "new" / "b.csv").write_text("x,y,colour,size,target,extra\n1,2,red,S,no,3\n")
    with pytest.raises(UserError, match=r"b.csv: files have different schemas: column 'extra'"):
        apply(prepared, str(tmp_path / "new"), tmp_path / "enc.parquet")
    (tmp_path / "new" / "b.csv").write_text("x,y,colour,size,target\nabc,2,red,S,no\n")
    with pytest.raises(UserError, match=r"a.csv: files have different schemas"):
        apply(prepared, str(tmp_path / "new"), tmp_path / "enc.parquet")


def test_a_missing_column_is_named_with_its_file(tmp_path, prepared):
    _tabular_raw(5, seed=2).drop(columns="size").to_csv(tmp_path / "new.csv", index=False)
    result = stoker("data", "apply", prepared, str(tmp_path / "new.csv"), str(tmp_path / "enc.parquet"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "new.csv: column 'size' is missing (the training data had it)" in result.stderr
    assert not (tmp_path / "enc.parquet").exists()


def test_an_empty_source_writes_the_columns(tmp_path, prepared):
    (tmp_path / "new.csv").write_text("x,y,colour,size,target\n")
    assert apply(prepared, str(tmp_path / "new.csv"), tmp_path / "enc.parquet") == {
        "rows": 0, "imputed_rows": 0, "unknown_labels": 0}
    table = pq.read_table(tmp_path / "enc.parquet")
    assert table.num_rows == 0 and table.column_names == [*Manifest.read(prepared, S3Config()).features, "label"]
