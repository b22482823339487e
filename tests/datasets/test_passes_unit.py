"""The tabular and text passes in this process (the local engine), no Ray: plan, analyse, fit,
transform and write, on small CSVs whose answers are known row by row.

Each source row carries a unique id (a numeric feature, or a unique word in a text), so the rows
written to the shards can be traced back to the source: every kept row in exactly one split,
the fitted statistics equal numpy's over the training rows, each encoded value right."""

from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stoker.datasets import file_passes, stats, tabular, text
from stoker.datasets.config import DataConfig
from stoker.datasets.io import Rejects, detect_format
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, SPLITS
from stoker.datasets.storage import Staging, list_sources, scratch
from stoker.datasets.transform import PAD, UNKNOWN, apply_text
from stoker.errors import UserError

CATEGORIES = ("red", "green", "blue")


def _tabular_rows() -> pd.DataFrame:
    """60 rows: id 0-59, x a known float, c a colour, y a class; then the dirty rows."""
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({
        "id": np.arange(60),
        "x": np.round(rng.normal(5.0, 2.0, 60), 4),
        "c": [CATEGORIES[i % 3] for i in range(60)],
        "y": [i % 2 for i in range(60)],
    })
    return frame


def _write_dirty_csv(path: Path) -> pd.DataFrame:
    """The clean rows, plus 3 exact duplicates, 2 rows without a label and 1 without x."""
    clean = _tabular_rows()
    lines = ["id,x,c,y"]
    lines += [f"{r.id},{r.x},{r.c},{r.y}" for r in clean.itertuples()]
    lines += [f"{r.id},{r.x},{r.c},{r.y}" for r in clean.iloc[[3, 10, 41]].itertuples()]  # duplicates
    lines += ["100,1.5,red,", "101,2.5,blue,"]  # missing label
    lines += ["102,,green,1"]  # missing x: data.missing drop
    path.write_text("\n".join(lines) + "\n")
    return clean


def _analyse(config: DataConfig, stack: ExitStack, text_input: bool = False):
    """`prepare._analyse`'s steps for a tabular or text source, on the local engine."""
    files = list_sources(config.sources, config.s3)
    fmt = detect_format(files, config.format)
    first = tabular.sample(files, fmt, config)
    rejects = Rejects(quarantine=config.bad_records == "quarantine")
    spill = stack.enter_context(scratch(config.output, config.s3)) if config.duplicates == "drop" else None
    if text_input:
        plan = text.make_plan(first, files, fmt, config, config.sources[0])
        return text.analyse(plan, files, rejects, None, spill), files
    plan = tabular.make_plan(first, files, fmt, config, config.sources[0])
    return tabular.analyse(plan, files, tabular.local_runner, rejects, None, spill), files


def _staging(directory: Path) -> Staging:
    directory.mkdir(parents=True, exist_ok=True)
    return Staging(str(directory), fsspec.filesystem("file"), local=True)


def _read_split(out: Path, info: dict) -> pd.DataFrame:
    return pd.concat([pq.read_table(out / name).to_pandas() for name in info["files"]], ignore_index=True)


def test_tabular_passes_split_every_kept_row_once_and_fit_on_training_rows(tmp_path):
    source = tmp_path / "data.csv"
    clean = _write_dirty_csv(source)
    config = DataConfig(source=str(source), label="y", output=str(tmp_path / "out"), duplicates="drop",
                        rows_per_shard=16)
    with ExitStack() as stack:
        analysed, files = _analyse(config, stack)
        assert analysed.dropped == Counter({"duplicate": 3, "missing_label": 2, "missing_value": 1})
        assert analysed.rows_read == 66
        assert analysed.classes == [0, 1]
        assert analysed.features == ["id", "x", "c=blue", "c=green", "c=red"]  # categories sorted
        splits = tabular.write_local(analysed, files, _staging(tmp_path / "out"), config)

    written = {name: _read_split(tmp_path / "out", splits[name]) for name in SPLITS}
    numeric = analysed.transform["numeric"]
    ids = {}
    for name, frame in written.items():
        assert splits[name]["rows"] == len(frame)
        assert all(len(pq.read_table(tmp_path / "out" / f)) <= 16 for f in splits[name]["files"])
        # Standardised with the fitted statistics: undo it to find each row's source id.
        raw = frame["id"].to_numpy(np.float64) * numeric["id"]["std"] + numeric["id"]["mean"]
        ids[name] = np.rint(raw).astype(int)
        np.testing.assert_allclose(raw, ids[name], atol=1e-3)
    every = np.concatenate(list(ids.values()))
    # Every kept row lands in exactly one split; duplicates and dropped rows in none.
    assert sorted(every.tolist()) == list(range(60))
    assert [len(ids[n]) for n in SPLITS] == [sum(c.values()) for c in analysed.labels]
    assert sum(analysed.file_rows[0]) == 60
    assert 30 <= len(ids["train"]) <= 54 and len(ids["validation"]) and len(ids["test"])

    # The statistics are the training rows' alone (population std, as the transform uses).
    train = clean.set_index("id").loc[ids["train"]]
    assert numeric["x"]["mean"] == pytest.approx(train["x"].mean(), rel=1e-12)
    assert numeric["x"]["std"] == pytest.approx(train["x"].to_numpy().std(), rel=1e-9)
    assert numeric["x"]["min"] == train["x"].min() and numeric["x"]["max"] == train["x"].max()
    assert analysed.transform["categorical"]["c"]["categories"] == sorted(set(train["c"]))

    for name, frame in written.items():
        rows = clean.set_index("id").loc[ids[name]]
        expected_x = (rows["x"].to_numpy() - numeric["x"]["mean"]) / numeric["x"]["std"]
        np.testing.assert_allclose(frame["x"].to_numpy(), expected_x, rtol=1e-5, atol=1e-5)
        for colour in CATEGORIES:
            np.testing.assert_array_equal(frame[f"c={colour}"].to_numpy(), (rows["c"] == colour).to_numpy(np.float32))
        # Class codes index analysed.classes.
        np.testing.assert_array_equal(frame[LABEL_COLUMN].to_numpy(), rows["y"].to_numpy())
        assert frame[LABEL_COLUMN].dtype == np.int64
    # The counts by class add up to what was written.
    counts = tabular.class_counts(analysed)
    for name in SPLITS:
        labels = Counter(clean.set_index("id").loc[ids[name], "y"])
        assert counts[name] == {str(c): labels.get(c, 0) for c in analysed.classes}


def test_integer_classes_stay_integers_when_a_label_is_missing(tmp_path):
    source = tmp_path / "data.csv"
    _write_dirty_csv(source)
    config = DataConfig(source=str(source), label="y", output=str(tmp_path / "out"))
    with ExitStack() as stack:
        analysed, _ = _analyse(config, stack)
    assert [type(c) for c in analysed.classes] == [int, int]
    assert set(tabular.class_counts(analysed)["train"]) == {"0", "1"}


def test_ordinal_codes_and_imputed_values(tmp_path):
    source = tmp_path / "data.csv"
    clean = _tabular_rows()
    clean.loc[[5, 20], "x"] = np.nan  # imputed with the training median, not dropped
    clean.to_csv(source, index=False)
    config = DataConfig(source=str(source), label="y", output=str(tmp_path / "out"), encoding="ordinal",
                        scale="none", missing="median")
    with ExitStack() as stack:
        analysed, files = _analyse(config, stack)
        splits = tabular.write_local(analysed, files, _staging(tmp_path / "out"), config)
    assert analysed.dropped == Counter()
    categories = analysed.transform["categorical"]["c"]["categories"]
    assert categories == ["blue", "green", "red"]
    frames = {n: _read_split(tmp_path / "out", splits[n]) for n in SPLITS}
    train_ids = frames["train"]["id"].astype(int)
    fill = clean.set_index("id").loc[train_ids, "x"].median()  # NaN skipped, as pandas does
    assert analysed.transform["numeric"]["x"]["fill"] == pytest.approx(fill)
    for frame in frames.values():
        rows = clean.set_index("id").loc[frame["id"].astype(int)]
        np.testing.assert_array_equal(frame["c"].to_numpy(), [categories.index(c) for c in rows["c"]])
        expected = rows["x"].fillna(fill).to_numpy(np.float32)
        np.testing.assert_allclose(frame["x"].to_numpy(), expected, rtol=1e-6)


def test_regression_label_is_kept_as_a_number(tmp_path):
    source = tmp_path / "data.csv"
    clean = _tabular_rows().assign(y=lambda f: f["x"] * 3 + 1)
    clean.to_csv(source, index=False)
    config = DataConfig(source=str(source), label="y", task="regression", output=str(tmp_path / "out"),
                        scale="none")
    with ExitStack() as stack:
        analysed, files = _analyse(config, stack)
        splits = tabular.write_local(analysed, files, _staging(tmp_path / "out"), config)
    assert analysed.classes is None
    frame = pd.concat([_read_split(tmp_path / "out", splits[n]) for n in SPLITS], ignore_index=True)
    assert frame[LABEL_COLUMN].dtype == np.float32
    np.testing.assert_allclose(frame[LABEL_COLUMN], frame["x"] * 3 + 1, rtol=1e-5)


def test_a_bad_value_names_its_file_row_and_column(tmp_path):
    source = tmp_path / "bad.csv"
    source.write_text("x,y\n1.0,0\n2.0,1\n3.0,0\nabc,1\n5.0,0\n")
    config = DataConfig(source=str(source), label="y", output=str(tmp_path / "out"))
    with ExitStack() as stack, pytest.raises(UserError) as raised:
        _analyse(config, stack)
    message = str(raised.value)
    assert message.startswith(f"{source}: row 4 (line 5), column 'x': 'abc' is not a number"), message
    assert "\n" not in message


def test_a_ragged_row_names_its_file_and_row_or_is_quarantined(tmp_path):
    source = tmp_path / "ragged.csv"
    source.write_text("x,y\n1.0,0\n2.0,1\n3.0\n4.0,0\n5.0,1\n6.0,0\n")
    config = DataConfig(source=str(source), label="y", output=str(tmp_path / "out"))
    with ExitStack() as stack, pytest.raises(UserError) as raised:
        _analyse(config, stack)
    assert str(raised.value).startswith(f"{source}: row 3 (line 4): CSV parse error: Expected 2 columns, got 1")
    quarantine = config.model_copy(update={"bad_records": "quarantine"})
    files = list_sources(quarantine.sources, None)
    plan = tabular.make_plan(tabular.sample(files, "csv", quarantine), files, "csv", quarantine, str(source))
    rejects = Rejects(quarantine=True)
    analysed = tabular.analyse(plan, files, tabular.local_runner, rejects)
    assert [(r["file"], r["row"], r["line"], r["reason"]) for r in rejects.records] == [
        (str(source), 3, 4, "ragged_row")]
    assert analysed.rows_read == 5 and 0 in analysed.plan.whole  # read whole, in every pass


def test_per_file_analysis_merges_to_the_whole(tmp_path):
    """Two files analysed one by one and merged equal the statistics of their rows together."""
    frame = _tabular_rows()
    (tmp_path / "src").mkdir()
    frame.iloc[:25].to_csv(tmp_path / "src" / "a.csv", index=False)
    frame.iloc[25:].to_csv(tmp_path / "src" / "b.csv", index=False)
    config = DataConfig(source=str(tmp_path / "src"), label="y", output=str(tmp_path / "out"))
    with ExitStack() as stack:
        analysed, files = _analyse(config, stack)
        splits = tabular.write_local(analysed, files, _staging(tmp_path / "out"), config)
    assert len(files) == 2 and [sum(r) for r in analysed.file_rows] == [25, 35]
    train = _read_split(tmp_path / "out", splits["train"])
    numeric = analysed.transform["numeric"]
    ids = np.rint(train["id"].to_numpy(np.float64) * numeric["id"]["std"] + numeric["id"]["mean"]).astype(int)
    x = frame.set_index("id").loc[ids, "x"].to_numpy()
    assert numeric["x"]["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert numeric["x"]["std"] == pytest.approx(x.std(), rel=1e-9)
    assert set(ids) & set(range(25)) and set(ids) & set(range(25, 60))  # both files' rows trained on


def test_column_statistics_on_threads_equal_one_thread(tmp_path, monkeypatch):
    """The local engine summarises a batch's columns on several threads: the statistics, the
    approximate quantiles (a small limit puts every column in the sketch, and it compacts) and the shards are the
    same as on one thread. Float features are written without a dictionary, the label with."""
    monkeypatch.setattr(file_passes, "BATCH_ROWS", 1000)
    monkeypatch.setattr(stats, "EXACT_QUANTILE_VALUES", 200)
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({f"f{i}": rng.normal(i, 1 + i, 9000) for i in range(6)} | {"y": rng.integers(0, 3, 9000)})
    frame.loc[frame.index[::11], "f2"] = np.nan
    frame.to_csv(tmp_path / "data.csv", index=False)

    def runner(threads: int) -> tabular.Runner:
        def run(function, files, plan, *args):
            plan = replace(plan, threads=threads)
            return (file_passes.per_file(function, item, index, plan, *args) for index, item in enumerate(files))
        return run

    results = []
    for threads in (1, 4):
        config = DataConfig(source=str(tmp_path / "data.csv"), label="y", output=str(tmp_path / f"out{threads}"),
                            missing="median")
        files = list_sources(config.sources, config.s3)
        plan = tabular.make_plan(tabular.sample(files, "csv", config), files, "csv", config, config.sources[0])
        analysed = tabular.analyse(plan, files, runner(threads), Rejects(quarantine=False))
        splits = tabular.write_local(analysed, files, _staging(tmp_path / f"out{threads}"), config)
        assert analysed.report["quantiles"]["normalized_rank_error"] > 0  # the sketch has compacted
        results.append((analysed.transform, analysed.report, {n: _read_split(tmp_path / f"out{threads}", splits[n])
                                                              for n in SPLITS}))
    (transform, report, written), (transform4, report4, written4) = results
    assert transform == transform4 and report == report4
    for name in SPLITS:
        pd.testing.assert_frame_equal(written[name], written4[name])
    shard = pq.ParquetFile(tmp_path / "out1" / tabular.shard_name("train", 0)).metadata.row_group(0)
    encodings = {shard.column(i).path_in_schema: shard.column(i).encodings for i in range(shard.num_columns)}
    assert "RLE_DICTIONARY" not in encodings["f0"] and "RLE_DICTIONARY" in encodings[LABEL_COLUMN]


# ------------------------------------------------------------------------------------ text

WORDS = ("alpha", "beta", "gamma", "delta")


def _text_csv(path: Path) -> list[str]:
    """40 texts: a unique word wN (it tells which split a row went to), common words, punctuation."""
    texts = [f"W{i} {WORDS[i % 4]}, {WORDS[(i * 3) % 4]}! the End." for i in range(40)]
    lines = ["text,label"] + [f'"{t}",{i % 2}' for i, t in enumerate(texts)]
    lines += ['"",1', '"   ",0']  # no text: dropped
    path.write_text("\n".join(lines) + "\n")
    return texts


def _clean(sentence: str) -> list[str]:
    return "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in sentence.lower()).split()


def test_text_passes_vocabulary_and_token_ids(tmp_path):
    source = tmp_path / "texts.csv"
    texts = _text_csv(source)
    config = DataConfig(source=str(source), label="label", output=str(tmp_path / "out"),
                        text={"max_length": 6, "vocab_size": 100})
    with ExitStack() as stack:
        analysed, files = _analyse(config, stack, text_input=True)
        assert analysed.dropped == Counter({"missing_text": 2})
        assert analysed.classes == [0, 1] and analysed.features == [FEATURES_COLUMN]
        staging = _staging(tmp_path / "out")
        splits = text.write(analysed, files, staging, config)
        per_file = list(text.transform_file(files[0], 0, analysed.plan, analysed.transform, analysed.classes))

    vocabulary = analysed.transform["text"]["vocabulary"]
    assert vocabulary[:2] == ["<pad>", "<unk>"]
    unique = {w for w in vocabulary if w.startswith("w") and w[1:].isdigit()}
    train_rows = sorted(int(w[1:]) for w in unique)
    # The vocabulary is counted over the training rows alone: most frequent first, ties alphabetical.
    counts = Counter(t for i in train_rows for t in _clean(texts[i]))
    expected = sorted(counts, key=lambda t: (-counts[t], t))
    assert vocabulary[2:] == expected
    assert len(train_rows) == sum(analysed.labels[0].values())
    assert sum(splits[n]["rows"] for n in SPLITS) == 40
    assert analysed.report["columns"]["text"]["words_max"] == 5  # words as written, punctuation on
    assert analysed.report["columns"]["text"]["truncated_rows"] == 0

    index = {t: i for i, t in enumerate(vocabulary)}

    def encoded(row: int) -> list[int]:
        tokens = _clean(texts[row])
        return [index.get(t, UNKNOWN) for t in tokens] + [PAD] * (6 - len(tokens))

    seen = []
    for name in SPLITS:
        frame = _read_split(tmp_path / "out", splits[name])
        assert len(frame) == splits[name]["rows"]
        for ids, label in zip(frame[FEATURES_COLUMN], frame[LABEL_COLUMN], strict=True):
            ids = list(ids)
            assert len(ids) == 6
            if name == "train":
                row = int(vocabulary[ids[0]][1:])
            else:
                assert ids[0] == UNKNOWN  # its unique word was never seen in training
                # The row is the one whose other tokens match (they repeat every 4 rows; the
                # label's parity pins it to two rows of every four).
                row = next(i for i in range(40) if i not in train_rows and i not in seen and i % 2 == label
                           and encoded(i) == ids)
            assert ids == encoded(row)
            assert label == row % 2
            seen.append(row)
    assert sorted(seen) == list(range(40))  # every row in exactly one split
    # transform_file yields the same rows split by split, in source order.
    assert sum(t.num_rows for _, t in per_file) == 40
    assert {code for code, _ in per_file} <= {0, 1, 2}

    # A known sentence, through the fitted transform: lower-cased, punctuation gone, unknown -> 1.
    known = apply_text(["The END, alpha! zebra"], analysed.transform["text"])
    assert known.tolist() == [[index["the"], index["end"], index["alpha"], UNKNOWN, PAD, PAD]]


def test_text_truncates_and_caps_the_vocabulary(tmp_path):
    source = tmp_path / "texts.csv"
    rows = ["one two three four five six seven"] * 8 + ["one two"] * 8
    source.write_text("text\n" + "\n".join(rows) + "\n")
    config = DataConfig(source=str(source), task="language_modeling", output=str(tmp_path / "out"),
                        text={"max_length": 4, "vocab_size": 4, "min_frequency": 2})
    with ExitStack() as stack:
        analysed, files = _analyse(config, stack, text_input=True)
        splits = text.write(analysed, files, _staging(tmp_path / "out"), config)
    # "one" and "two" are in every row; the rest tie and only the cap's room is kept, alphabetically.
    assert analysed.transform["text"]["vocabulary"] == ["<pad>", "<unk>", "one", "two"]
    assert analysed.classes is None and analysed.plan.label is None
    train_rows = sum(analysed.labels[0].values())
    long_train = analysed.report["columns"]["text"]["truncated_rows"]
    assert 0 < long_train <= train_rows
    frame = pd.concat([_read_split(tmp_path / "out", splits[n]) for n in SPLITS], ignore_index=True)
    assert LABEL_COLUMN not in frame.columns and len(frame) == 16
    ids = sorted(tuple(v) for v in frame[FEATURES_COLUMN])
    assert ids == [(2, 3, 0, 0)] * 8 + [(2, 3, 1, 1)] * 8


def test_duplicate_spill_is_shared_by_the_passes(tmp_path):
    """The rows the keys pass marks as duplicates are the ones pass 2 and 3 drop."""
    source = tmp_path / "data.csv"
    _write_dirty_csv(source)
    config = DataConfig(source=str(source), label="y", output=str(tmp_path / "out"), duplicates="drop")
    with ExitStack() as stack:
        analysed, files = _analyse(config, stack)
        duplicates = file_passes.duplicate_rows(analysed.plan, 0)
    # File row numbers (0-based) of the 3 repeated rows, after the 60 originals.
    assert duplicates.tolist() == [60, 61, 62]
