"""Sources, cleaning policies, quarantine, transforms, grouped splits and the bias report."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stoker.datasets.config import DataConfig
from stoker.datasets.manifest import Manifest
from stoker.datasets.prepare import prepare
from stoker.errors import UserError


def cfg(source, output, **extra) -> DataConfig:
    extra.setdefault("label", "target")
    return DataConfig(source=source if isinstance(source, list) else str(source), output=str(output), **extra)


def split(output, name) -> pd.DataFrame:
    return pq.read_table(output / name).to_pandas()


def frame(n=200, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": rng.normal(5, 2, n), "y": rng.uniform(0, 10, n), "target": ["a", "b"] * (n // 2)})


def test_jsonl_invalid_line_fails_naming_file_and_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"x": 1, "target": "a"}\n{"x": 2, "target": \n{"x": 3, "target": "b"}\n')
    with pytest.raises(UserError) as info:
        prepare(cfg(src, tmp_path / "out"))
    assert str(info.value).startswith(f"{src}: row 2 (line 2): invalid JSON line: Expecting value"), info.value
    assert not (tmp_path / "out").exists()


def test_quarantine_sets_bad_records_aside_with_reasons(tmp_path):
    lines = [json.dumps({"x": float(i), "target": "ab"[i % 2]}) for i in range(60)]
    lines[10] = '{"x": oops}'
    lines[20] = "[1, 2]"
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    manifest = prepare(cfg(tmp_path / "in.jsonl", tmp_path / "out", bad_records="quarantine"))
    assert manifest.rejected == {"invalid_json": 2}
    assert sum(s["rows"] for s in manifest.splits.values()) == 58
    rejected = [json.loads(line) for line in (tmp_path / "out/rejected/rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"], r["content"]) for r in rejected] == [
        (11, "invalid_json", '{"x": oops}'), (21, "invalid_json", "[1, 2]")]


def test_ragged_csv_row_quarantined(tmp_path):
    rows = "\n".join(f"{i},{i * 2},{'ab'[i % 2]}" for i in range(40))
    (tmp_path / "in.csv").write_text("x,y,target\n" + rows + "\n7,8\n")
    manifest = prepare(cfg(tmp_path / "in.csv", tmp_path / "out", bad_records="quarantine"))
    assert manifest.rejected == {"ragged_row": 1}
    [record] = [json.loads(x) for x in (tmp_path / "out/rejected/rejected.jsonl").read_text().splitlines()]
    assert record["line"] == 42 and record["content"] == "7,8"


def test_glob_and_directory_of_files_and_schema_mismatch(tmp_path):
    data = frame(300)
    (tmp_path / "parts").mkdir()
    for i in range(3):
        data.iloc[i * 100:(i + 1) * 100].to_csv(tmp_path / "parts" / f"p{i}.csv", index=False)
    by_glob = prepare(cfg(str(tmp_path / "parts" / "p*.csv"), tmp_path / "a"))
    by_dir = prepare(cfg(tmp_path / "parts", tmp_path / "b"))
    assert sum(s["rows"] for s in by_glob.splits.values()) == 300
    assert by_glob.source_files == 3 and by_glob.source_fingerprint == by_dir.source_fingerprint
    data.iloc[:50].rename(columns={"y": "z"}).to_csv(tmp_path / "parts" / "p3.csv", index=False)
    with pytest.raises(UserError, match=r"p3.csv: files have different schemas: column 'y'"):
        prepare(cfg(tmp_path / "parts", tmp_path / "c"))
    with pytest.raises(UserError, match=r"^data.source: .*q\*.csv: the pattern matches no files"):
        prepare(cfg(str(tmp_path / "parts" / "q*.csv"), tmp_path / "d"))


def test_cleaning_policies_count_every_dropped_row(tmp_path):
    data = frame(200)
    data["x"] = data["x"].astype(object)
    data.loc[5, "x"] = "n/a?"                      # does not parse -> bad_value
    data.loc[[7, 8], "y"] = np.nan                 # y: drop policy
    data.loc[[9], "x"] = np.nan                    # x: median imputed
    data = pd.concat([data, data.iloc[[20, 21]]])  # two exact duplicates
    data.to_csv(tmp_path / "in.csv", index=False)
    manifest = prepare(cfg(tmp_path / "in.csv", tmp_path / "out", bad_values="drop", duplicates="drop",
                           missing="median", missing_by_column={"y": "drop"}))
    assert manifest.dropped == {"bad_value": 1, "duplicate": 2, "missing_value": 2}
    assert sum(s["rows"] for s in manifest.splits.values()) == 197
    stats = manifest.transform["numeric"]["x"]
    assert stats["policy"] == "median" and stats["fill"] is not None
    with pytest.raises(UserError, match=r"in.csv: row 6 \(line 7\), column 'x': 'n/a\?' is not a number"):
        prepare(cfg(tmp_path / "in.csv", tmp_path / "out2"))


def test_minmax_ordinal_and_derived_features(tmp_path):
    data = frame(300)
    data["colour"] = ["red", "green", "blue"] * 100
    data.to_csv(tmp_path / "in.csv", index=False)
    manifest = prepare(cfg(tmp_path / "in.csv", tmp_path / "out", scale="minmax", encoding="ordinal",
                           derived={"ratio": "log1p(y) / (x ** 2 + 1)"}))
    assert manifest.features == ["x", "y", "ratio", "colour"]
    train = split(tmp_path / "out", "train")
    assert train["x"].min() == pytest.approx(0) and train["x"].max() == pytest.approx(1)
    assert set(train["colour"]) == {0.0, 1.0, 2.0}  # blue, green, red
    raw = pd.read_csv(tmp_path / "in.csv")
    expected = np.log1p(raw["y"]) / (raw["x"] ** 2 + 1)
    stats = manifest.transform["numeric"]["ratio"]
    assert stats["max"] <= expected.max() and stats["min"] >= expected.min()
    # Undoing the min-max scaling gives back the expression's value of each training row.
    scaled_back = train["ratio"].to_numpy(np.float64) * (stats["max"] - stats["min"]) + stats["min"]
    assert (np.abs(scaled_back[:, None] - expected.to_numpy()[None, :]).min(axis=1) < 1e-5).all()
    with pytest.raises(UserError, match=r"^data.derived.bad: .*__import__.* is not allowed"):
        prepare(cfg(tmp_path / "in.csv", tmp_path / "o2", derived={"bad": "__import__('os')"}))


def test_grouped_split_keeps_groups_together(tmp_path):
    data = frame(400)
    data["patient"] = np.repeat(np.arange(40), 10)
    data.to_csv(tmp_path / "in.csv", index=False)
    manifest = prepare(cfg(tmp_path / "in.csv", tmp_path / "out", features=["x", "patient"], scale="none",
                           split={"group_by": "patient"}))
    groups = {s: set(split(tmp_path / "out", s)["patient"].astype(int)) for s in ("train", "validation", "test")}
    assert not groups["train"] & groups["validation"] and not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    assert len(groups["train"]) + len(groups["validation"]) + len(groups["test"]) == 40
    assert abs(manifest.splits["train"]["rows"] / 400 - 0.7) <= 0.05


def test_imbalance_report_and_warning(tmp_path):
    data = frame(440)
    data["target"] = ["common"] * 400 + ["rare"] * 40
    data.to_csv(tmp_path / "in.csv", index=False)
    manifest = prepare(cfg(tmp_path / "in.csv", tmp_path / "out", imbalance_warning_ratio=5))
    balance = manifest.report["class_balance"]["train"]
    assert balance["imbalance_ratio"] == pytest.approx(10, rel=0.05) and balance["smallest_class"] == "rare"
    assert any("class 'rare' is under-represented" in w for w in manifest.warnings)
    assert manifest.report["columns"]["x"]["kind"] == "numeric"
    assert manifest.report["columns"]["x"]["median"] == pytest.approx(
        float(pd.read_csv(tmp_path / "in.csv")["x"].median()), abs=0.3)
    quiet = prepare(cfg(tmp_path / "in.csv", tmp_path / "out2", imbalance_warning_ratio=20))
    assert quiet.warnings == []


def _image_folder(root, per_class=12, broken=False):
    rng = np.random.default_rng(0)
    for index, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 120 * index, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png" if i % 2 else root / name / f"{i}.jpg")
    if broken:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")


def test_image_folder_to_normalised_pixels(tmp_path):
    _image_folder(tmp_path / "img")
    manifest = prepare(cfg(tmp_path / "img", tmp_path / "out", label=None, image={"size": [8, 8]}))
    assert (manifest.modality, manifest.input_shape, manifest.classes) == ("image", [3, 8, 8], ["cat", "dog"])
    assert manifest.features == ["features"] and manifest.label == "class"
    table = pq.read_table(tmp_path / "out" / "train")
    assert table.schema.field("features").type.value_type == pa.float32()
    pixels = np.stack(table["features"].to_numpy(zero_copy_only=False))
    assert pixels.shape == (table.num_rows, 192)
    # Standardised per channel with the training split's statistics.
    assert abs(pixels.reshape(-1, 3, 64).mean(axis=(0, 2))).max() < 1e-4
    labels = table["label"].to_numpy()
    assert pixels[labels == 1].mean() > pixels[labels == 0].mean()


def test_image_that_does_not_decode(tmp_path):
    _image_folder(tmp_path / "img", broken=True)
    with pytest.raises(UserError, match=r"broken.png: image does not decode"):
        prepare(cfg(tmp_path / "img", tmp_path / "out", label=None))
    assert not (tmp_path / "out").exists()
    manifest = prepare(cfg(tmp_path / "img", tmp_path / "out", label=None, bad_records="quarantine"))
    assert manifest.rejected == {"unreadable_image": 1}


def test_text_classification_vocabulary_from_training_split(tmp_path):
    rng = np.random.default_rng(0)
    texts = [f"The {w} movie was {'great' if y else 'awful'}, truly!" for w, y in
             zip(rng.choice(["old", "new", "long"], 90), [0, 1] * 45, strict=True)]
    pd.DataFrame({"review": texts, "target": [0, 1] * 45}).to_csv(tmp_path / "in.csv", index=False)
    manifest = prepare(cfg(tmp_path / "in.csv", tmp_path / "out", text={"column": "review", "max_length": 6,
                                                                       "stop_words": "english"}))
    assert (manifest.modality, manifest.input_shape) == ("text", [6])
    vocab = manifest.transform["text"]["vocabulary"]
    assert vocab[:2] == ["<pad>", "<unk>"] and "the" not in vocab and "great" in vocab and "," not in vocab
    assert manifest.vocab_size == len(vocab)
    table = pq.read_table(tmp_path / "out" / "train")
    assert table.schema.field("features").type.value_type == pa.int32()
    ids = np.stack(table["features"].to_numpy(zero_copy_only=False))
    # "the X movie was great truly" minus stop words -> 4 tokens, then padding.
    assert ids.shape[1] == 6 and (ids[:, 4:] == 0).all() and (ids[:, :4] > 1).all()


def test_language_modeling_from_text_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_text("\n".join(f"line {j} of file {i}" for j in range(20)) + "\n\n")
    manifest = prepare(DataConfig(source=str(tmp_path / "corpus"), output=str(tmp_path / "out"),
                                  task="language_modeling", text={"max_length": 8}))
    assert manifest.label is None and manifest.classes is None and manifest.modality == "text"
    assert sum(s["rows"] for s in manifest.splits.values()) == 60
    assert pq.read_table(tmp_path / "out" / "train").column_names == ["features"]
    assert Manifest.read(tmp_path / "out").input_shape == [8]
