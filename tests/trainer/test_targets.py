"""Regression targets: standardised with the training split's statistics, reported in the
label's own units (scikit-learn's diabetes: targets 25..346)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stoker.config import parse_config
from stoker.datasets.manifest import Manifest
from stoker.trainer.targets import InOriginalUnits, TargetScale, training_target_scale
from tests.conftest import run_config


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory) -> dict:
    from sklearn.datasets import load_diabetes

    from stoker.datasets.prepare import prepare

    raw = tmp_path_factory.mktemp("diabetes-raw") / "diabetes.csv"
    load_diabetes(as_frame=True).frame.to_csv(raw, index=False)
    base = run_config(raw, tmp_path_factory.mktemp("diabetes-prepared") / "d", tmp_path_factory.mktemp("runs"))
    base["data"] = {**base["data"], "task": "regression",
                    "split": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 0, "stratify": False}}
    prepare(parse_config(base, "test").data)
    return base


def test_scale_is_the_training_splits_and_round_trips(diabetes):
    prepared = diabetes["data"]["output"]
    manifest = Manifest.read(prepared)
    scale = training_target_scale(prepared, manifest)
    labels = pq.read_table([f"{prepared}/{name}" for name in manifest.splits["train"]["files"]])["label"].to_numpy()
    assert scale.mean == pytest.approx(labels.mean()) and scale.std == pytest.approx(labels.std())
    assert 100 < scale.mean < 200 and scale.std > 50  # not already standardised by prepare
    y = torch.tensor(labels[:8], dtype=torch.float32)
    assert torch.allclose(scale.original(scale.standardise(y)), y, atol=1e-3)


def test_exported_network_answers_in_original_units():
    network = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(network.weight)
    torch.nn.init.constant_(network.bias, 1.0)  # one standard deviation above the mean
    model = InOriginalUnits(network, TargetScale(150.0, 70.0))
    assert model(torch.zeros(3, 2)).flatten().tolist() == [220.0, 220.0, 220.0]
    assert np.isclose(float(model(torch.zeros(1, 2))), 220.0)


def test_classification_has_no_target_scale(prepared):
    assert training_target_scale(prepared["data"]["output"], Manifest.read(prepared["data"]["output"])) is None
