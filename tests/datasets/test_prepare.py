"""The data slice: read, clean, encode, split, write shards + manifest, atomically."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stoker.datasets import file_passes
from stoker.datasets.config import DataConfig
from stoker.datasets.manifest import LABEL_COLUMN, Manifest
from stoker.datasets.prepare import prepare
from stoker.errors import UserError


def config(source, output, **extra) -> DataConfig:
    return DataConfig(source=str(source), label="target", output=str(output), **extra)


def read_split(output, split) -> pd.DataFrame:
    return pq.read_table(output / split).to_pandas()


def test_digits_split_70_15_15_stratified_and_recorded(digits_csv, tmp_path):
    output = tmp_path / "prepared"
    manifest = prepare(config(digits_csv, output, rows_per_shard=500))

    rows = {s: manifest.splits[s]["rows"] for s in ("train", "validation", "test")}
    assert sum(rows.values()) == 1797
    assert abs(rows["train"] / 1797 - 0.70) < 0.01
    assert abs(rows["validation"] / 1797 - 0.15) < 0.01
    assert abs(rows["test"] / 1797 - 0.15) < 0.01
    # Shards: about 1258 train rows at 500 per shard -> 3 files, all listed in the manifest.
    assert manifest.splits["train"]["files"] == [f"train/part-0000{i}.parquet" for i in range(3)]
    assert sorted(p.name for p in (output / "train").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]

    # Stratified: each class's share of every split is within 1.5 points of the whole.
    raw = pd.read_csv(digits_csv)["target"].value_counts(normalize=True)
    for split in ("train", "validation", "test"):
        counts = manifest.splits[split]["class_counts"]
        total = sum(counts.values())
        assert total == rows[split]
        for cls, count in counts.items():
            assert abs(count / total - raw[int(cls)]) < 0.015, (split, cls)

    on_disk = Manifest.read(output)
    assert on_disk.num_features == 64 and on_disk.num_classes == 10
    assert on_disk.source_fingerprint.startswith("sha256:") and len(on_disk.source_fingerprint) == 71
    assert json.loads((output / "manifest.json").read_text())["classes"] == list(range(10))
    assert not list(tmp_path.glob(".prepared.tmp-*"))


def test_standardisation_uses_training_statistics_only(digits_csv, tmp_path):
    output = tmp_path / "prepared"
    manifest = prepare(config(digits_csv, output))
    train = read_split(output, "train")
    column = "pixel_3_3"
    assert abs(train[column].mean()) < 1e-4
    assert abs(train[column].std(ddof=0) - 1) < 1e-3
    # The saved statistics are the raw training split's, and they reproduce the stored values.
    stats = manifest.transform["numeric"][column]
    raw = pd.read_csv(digits_csv)
    test = read_split(output, "test")
    assert abs(test[column].mean()) > 1e-3  # not re-fit on the test split
    raw_values = np.sort((raw[column].to_numpy() - stats["mean"]) / stats["std"])
    assert np.allclose(np.sort(np.concatenate([train[column], read_split(output, "validation")[column], test[column]])),
                       raw_values, atol=1e-5)


def test_same_seed_same_split_and_new_seed_differs(digits_csv, tmp_path):
    a = prepare(config(digits_csv, tmp_path / "a"))
    b = prepare(config(digits_csv, tmp_path / "b"))
    c = prepare(config(digits_csv, tmp_path / "c", split={"seed": 7}))
    ta, tb, tc = (read_split(tmp_path / n, "test") for n in "abc")
    assert ta.equals(tb)
    assert not ta.equals(tc)
    assert a.source_fingerprint == b.source_fingerprint == c.source_fingerprint


def test_fingerprint_follows_content(tmp_path):
    frame = pd.DataFrame({"x": np.arange(40.0), "target": ["a", "b"] * 20})
    frame.to_csv(tmp_path / "one.csv", index=False)
    first = prepare(config(tmp_path / "one.csv", tmp_path / "p1"))
    frame.loc[0, "x"] = 99
    frame.to_csv(tmp_path / "one.csv", index=False)
    second = prepare(config(tmp_path / "one.csv", tmp_path / "p2"))
    assert first.source_fingerprint != second.source_fingerprint


def test_the_source_hash_gives_up_when_asked_so_a_failed_preparation_exits_at_once(tmp_path):
    import threading

    from stoker.datasets.storage import fingerprint, list_sources

    (tmp_path / "big.bin").write_bytes(b"x" * (3 << 20))
    files = list_sources([str(tmp_path / "big.bin")], None)
    assert fingerprint(files, None).startswith("sha256:")
    stop = threading.Event()
    stop.set()
    assert fingerprint(files, None, stop) == ""


def test_missing_values_drop_or_impute_with_training_mean(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(5, 2, 200), "z": rng.normal(size=200), "target": ["a", "b"] * 100})
    frame.loc[[3, 50, 120], "x"] = np.nan
    frame.loc[[7], "target"] = np.nan
    frame.to_csv(tmp_path / "gaps.csv", index=False)

    dropped = prepare(config(tmp_path / "gaps.csv", tmp_path / "drop"))
    assert dropped.dropped == {"missing_label": 1, "missing_value": 3}
    assert sum(s["rows"] for s in dropped.splits.values()) == 196

    imputed = prepare(config(tmp_path / "gaps.csv", tmp_path / "mean", missing="mean"))
    assert imputed.dropped == {"missing_label": 1}
    assert sum(s["rows"] for s in imputed.splits.values()) == 199
    stats = imputed.transform["numeric"]["x"]
    assert stats["fill"] == pytest.approx(stats["mean"])
    everything = pd.concat(read_split(tmp_path / "mean", s) for s in ("train", "validation", "test"))
    assert not everything["x"].isna().any()
    # Imputed rows sit exactly at the training mean, which standardises to 0.
    assert (everything["x"].abs() < 1e-6).sum() >= 3


def test_categorical_one_hot_from_training_categories(tmp_path):
    frame = pd.DataFrame({
        "colour": ["red", "green", "blue", "red"] * 25,
        "size": np.arange(100.0),
        "target": [0, 1] * 50,
    })
    frame.to_csv(tmp_path / "cat.csv", index=False)
    manifest = prepare(config(tmp_path / "cat.csv", tmp_path / "out"))
    assert manifest.transform["categorical"]["colour"]["categories"] == ["blue", "green", "red"]
    assert {"colour=blue", "colour=green", "colour=red", "size"} == set(manifest.features)
    train = read_split(tmp_path / "out", "train")
    one_hot = train[["colour=blue", "colour=green", "colour=red"]].to_numpy()
    assert (one_hot.sum(axis=1) == 1).all()


def test_regression_keeps_float_labels(tmp_path):
    frame = pd.DataFrame({"x": np.arange(60.0), "target": np.arange(60.0) * 0.5})
    frame.to_csv(tmp_path / "reg.csv", index=False)
    manifest = prepare(config(tmp_path / "reg.csv", tmp_path / "out", task="regression"))
    assert manifest.classes is None and manifest.splits["train"]["class_counts"] is None
    train = read_split(tmp_path / "out", "train")
    assert train[LABEL_COLUMN].dtype == np.float32
    assert set(train[LABEL_COLUMN] * 2).issubset(set(np.arange(60.0)))


def test_parquet_source(tmp_path, digits_csv):
    pd.read_csv(digits_csv).to_parquet(tmp_path / "digits.parquet")
    manifest = prepare(config(tmp_path / "digits.parquet", tmp_path / "out"))
    assert sum(s["rows"] for s in manifest.splits.values()) == 1797


def test_rerun_replaces_output_and_failure_keeps_old_one(digits_csv, tmp_path):
    output = tmp_path / "out"
    prepare(config(digits_csv, output))
    before = (output / "manifest.json").read_text()
    (tmp_path / "ragged.csv").write_text("a,target\n1,0\n2\n")
    with pytest.raises(UserError):
        prepare(config(tmp_path / "ragged.csv", output))
    assert (output / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ragged.csv"]


@pytest.mark.parametrize(
    ("contents", "extra", "expected"),
    [
        (None, {}, "data.source: {src}: no such file or directory"),
        ("a,b,target\n1,2,0\n3,4\n5,6,1\n", {}, "{src}: row 2 (line 3): CSV parse error: Expected 3 columns, got 2"),
        ("a,b,label\n1,2,0\n3,4,1\n", {}, "data.label: column 'target' is not in {src}"),
        ("a,target\n", {}, "data.source: {src}: no rows"),
        ("a,b,target\n1,x,0\n2,y,1\n", {"categorical": []}, "{src}: row 1 (line 2), column 'b': 'x' is not a number"),
        ("a,target\n" + "1,0\n" * 30 + "2,1\n", {}, "data.split: cannot split 31 rows"),
        ("a,target\n,0\n,1\n,1\n", {}, "data.missing: every row was dropped (missing_value)"),
    ],
    ids=["missing-file", "ragged-row", "no-label", "empty", "mixed-types", "rare-class", "all-dropped"],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, contents, extra, expected):
    src = tmp_path / "in.csv"
    if contents is not None:
        src.write_text(contents)
    output = tmp_path / "out"
    with pytest.raises(UserError) as info:
        prepare(config(src, output, **extra))
    assert str(info.value).startswith(expected.format(src=src)), str(info.value)
    assert "\n" not in str(info.value)
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("split", ["exact", "histogram"])
def test_ray_engine_writes_the_same_shards_and_manifest_as_local(ray_cluster, tmp_path, monkeypatch, split):
    """Both split methods: exact cut-offs from every hash, or cut-offs from per-class histograms
    merged from the files' tasks (with duplicates uncounted)."""
    if split == "histogram":
        monkeypatch.setattr(file_passes, "EXACT_SPLIT_MAX_BYTES", 0)
    rng = np.random.default_rng(3)
    for i in range(3):
        frame = pd.DataFrame({
            "x": rng.normal(size=200), "y": rng.integers(0, 5, 200).astype(float),
            "colour": rng.choice(["red", "green", "blue"], 200), "target": rng.choice(["a", "b", "c"], 200),
        })
        frame.loc[rng.random(200) < 0.05, "x"] = np.nan
        frame.loc[rng.random(200) < 0.02, "target"] = None
        frame.to_csv(tmp_path / f"part-{i}.csv", index=False)
    base = {"source": str(tmp_path / "*.csv"), "label": "target", "missing": "median",
            "derived": {"xy": "x * y"}, "rows_per_shard": 90, "duplicates": "drop"}
    local = prepare(DataConfig(**base, output=str(tmp_path / "local")))
    remote = prepare(DataConfig(**base, output=str(tmp_path / "ray"), engine="ray"))
    assert local.report["split"]["method"] == split
    assert remote.splits == local.splits and len(local.splits["train"]["files"]) > 2
    assert remote.transform == local.transform and remote.features == local.features
    assert remote.dropped == local.dropped and local.dropped.get("missing_label")
    assert {k: v for k, v in remote.report.items() if k != "timing"} == \
        {k: v for k, v in local.report.items() if k != "timing"}
    for info in local.splits.values():
        for name in info["files"]:
            assert pq.read_table(tmp_path / "ray" / name).equals(pq.read_table(tmp_path / "local" / name)), name


def test_ray_engine_reports_bad_rows_like_local(ray_cluster, tmp_path):
    (tmp_path / "a.csv").write_text("x,target\n1,0\n2,1\n3,0\n")
    (tmp_path / "b.csv").write_text("x,target\n1,0\n2,1,9\n3,0\n")
    with pytest.raises(UserError, match=r"b.csv: row 2 \(line 3\): CSV parse error: Expected 2 columns, got 3"):
        prepare(DataConfig(source=str(tmp_path / "*.csv"), label="target", output=str(tmp_path / "o"), engine="ray"))
    assert not (tmp_path / "o").exists()
