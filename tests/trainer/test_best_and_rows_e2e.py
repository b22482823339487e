"""One run, one truth, on scikit-learn's wine (its first 174 of 178 rows, 3 classes: 25- and
27-row validation and test splits, odd on 2 workers; 29 and 23 rows at 70/17/13, uneven on 3): the epoch the loop calls best (ties on accuracy broken
by the lower validation loss) is the checkpoint Ray keeps, the one export and the registry
take, and its reported metrics count every row (checked against scikit-learn on the exported
model's own predictions)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss

from stoker.cli import main
from stoker.config import parse_config
from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, Manifest
from tests.conftest import run_config, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wine(tmp_path_factory) -> dict:
    from sklearn.datasets import load_wine

    from stoker.datasets.prepare import prepare

    raw = tmp_path_factory.mktemp("wine-raw") / "wine.csv"
    # 174 rows: the hashed split then gives odd validation and test splits (25 and 27 rows).
    frame = load_wine(as_frame=True).frame
    frame.iloc[:174].to_csv(raw, index=False)
    base = run_config(raw, tmp_path_factory.mktemp("wine-prepared") / "wine", tmp_path_factory.mktemp("wine-runs"))
    prepare(parse_config(base, "test").data)
    return base


def split_arrays(prepared: str, split: str, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    manifest = Manifest.read(prepared)
    table = pq.read_table([f"{prepared}/{name}" for name in manifest.splits[split]["files"]])
    if features == [FEATURES_COLUMN]:
        x = np.stack(table[FEATURES_COLUMN].to_numpy(zero_copy_only=False))
    else:
        x = np.stack([table[f].to_numpy() for f in features], axis=1)
    return x.astype(np.float32), table[LABEL_COLUMN].to_numpy()


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_best_epoch_with_ties_is_what_export_registry_and_reports_use(ray_cluster, wine, tmp_path, capsys):
    from stoker.trainer import checkpoints as ckpt
    from stoker.trainer.evaluate import evaluate_export
    from stoker.trainer.export import load_exported

    prepared = wine["data"]["output"]
    rows = Manifest.read(prepared).splits
    assert rows["validation"]["rows"] % 2 == 1 and rows["test"]["rows"] % 2 == 1
    storage = tmp_path / "runs"
    # keep 1: the most Ray may keep besides the latest, so a best it ranked below a later
    # epoch would be deleted.
    config = dict(wine, name="wine-ties", storage=str(storage),
                  train={**wine["train"], "epochs": 12, "batch_size": 16, "checkpoint": {"keep": 1}})
    assert main(["train", str(write_config(tmp_path, config))]) == 0
    out = capsys.readouterr().out
    run_dir = storage / "wine-ties"
    records = lines(run_dir / "metrics.jsonl")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    best = final["best_epoch"]
    # The documented rule: highest accuracy, then the lowest validation loss, then the earliest.
    assert best == max(records, key=lambda r: (r["val_accuracy"], -r["val_loss"], -r["epoch"]))["epoch"]
    tied = [r["epoch"] for r in records if r["val_accuracy"] == records[best]["val_accuracy"]]
    assert len(tied) > 1 and tied[0] != best, f"no tie to break: {tied}"
    assert f"best epoch {best} " in out
    assert final["validation"]["loss"] == pytest.approx(records[best]["val_loss"], rel=1e-9)
    # Ray kept it, and it ranks first.
    kept = {ckpt.epoch_of(c) for c in ckpt.local_checkpoints(run_dir)}
    assert best in kept and final["checkpoint"] is not None

    assert main(["export", str(run_dir)]) == 0
    assert f"epoch {best} (best checkpoint" in capsys.readouterr().out
    export = run_dir / "export"
    assert json.loads((export / "model.json").read_text())["epoch"] == best
    assert main(["models", "register", "wine-ties", "--name", "wine", "--storage", str(storage)]) == 0
    assert f"epoch {best} (the best by val_accuracy)" in capsys.readouterr().out

    for split in ("test", "validation"):
        scores = evaluate_export(export, prepared, split)["metrics"]
        reported = final[split]
        for key in ("accuracy", "f1", "precision", "recall"):
            assert scores[key] == pytest.approx(reported[key], abs=1e-6), (split, key)
        assert scores["loss"] == pytest.approx(reported["loss"], rel=1e-4), split

    # Every row: scikit-learn on the exported model's predictions agrees with what the run
    # reported from its two workers.
    model, meta = load_exported(export)
    x, y = split_arrays(prepared, "test", meta["features"])
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    predicted = probs.argmax(1)
    matrix = final["test_details"]["confusion_matrix"]
    assert sum(map(sum, matrix)) == len(y) == rows["test"]["rows"]
    assert matrix == confusion_matrix(y, predicted, labels=[0, 1, 2]).tolist()
    assert final["test"]["accuracy"] == pytest.approx(accuracy_score(y, predicted), abs=1e-6)
    assert final["test"]["f1"] == pytest.approx(f1_score(y, predicted, average="macro"), abs=1e-6)
    assert final["test"]["loss"] == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]), rel=1e-4)


def test_three_workers_score_every_row_of_uneven_splits(ray_cluster, wine, tmp_path):
    from stoker.datasets.prepare import prepare
    from stoker.trainer.evaluate import evaluate_export
    from stoker.trainer.export import export_run
    from stoker.trainer.run import train

    # 70/17/13 instead of 70/15/15: splits that 3 workers cannot divide evenly (29 and 23 rows).
    data = {**wine["data"], "output": str(tmp_path / "wine-3"),
            "split": {"train": 0.7, "validation": 0.17, "test": 0.13, "seed": 0, "stratify": True}}
    config = dict(wine, name="wine-3", storage=str(tmp_path / "runs"), scaling={"num_workers": 3}, data=data,
                  train={**wine["train"], "epochs": 2, "batch_size": 16})
    run = parse_config(config, "test")
    prepare(run.data)
    splits = Manifest.read(data["output"]).splits
    assert splits["validation"]["rows"] % 3 and splits["test"]["rows"] % 3, splits
    result = train(run)
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    rows = splits["test"]["rows"]
    assert sum(map(sum, final["test_details"]["confusion_matrix"])) == rows
    scores = evaluate_export(export_run(result.run_dir), data["output"])["metrics"]
    assert scores["accuracy"] == pytest.approx(result.test["accuracy"], abs=1e-6)
    assert scores["loss"] == pytest.approx(result.test["loss"], rel=1e-4)
