"""`stoker monitor` on real prepared data: in-distribution data passes, shifted data, a changed
schema and degraded metrics are flagged with the documented exit codes."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from stoker.cluster.config import MonitorConfig
from stoker.cluster.monitor import monitor, numeric_drift, psi
from stoker.config import parse_config
from stoker.datasets.prepare import prepare
from stoker.errors import UserError
from tests.conftest import run_config


@pytest.fixture(scope="module")
def trained(digits_csv, tmp_path_factory):
    """A prepared digits dataset and a run directory that points at it (as trainer.run writes)."""
    root = tmp_path_factory.mktemp("monitor")
    config = run_config(digits_csv, root / "prepared", root / "runs")
    manifest = prepare(parse_config(config, "test").data)
    run_dir = root / "runs" / "test-run"
    run_dir.mkdir(parents=True)
    (run_dir / "dataset.json").write_text(json.dumps({"path": str(root / "prepared"), "source_fingerprint": manifest.source_fingerprint}))
    (run_dir / "config.yaml").write_text("cluster: {monitor: {psi: 0.2}}\n")
    (run_dir / "final_metrics.json").write_text(json.dumps({"test": {"accuracy": 0.95, "loss": 0.2}}))
    return run_dir, pd.read_csv(digits_csv)


def test_psi_is_zero_for_identical_and_large_for_disjoint_histograms():
    assert psi(np.array([10.0, 20, 30]), np.array([1.0, 2, 3])) == pytest.approx(0.0)
    assert psi(np.array([100.0, 0]), np.array([0.0, 100])) > 5


def test_numeric_drift_flags_a_shift_but_not_a_resample():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=5000)
    limits = MonitorConfig()
    assert not numeric_drift("x", reference, rng.normal(size=2000), limits).drifted
    shifted = numeric_drift("x", reference, rng.normal(loc=1.0, size=2000), limits)
    assert shifted.drifted and shifted.psi > 0.2 and shifted.ks_pvalue < 1e-10


def test_same_distribution_passes_and_exit_code_is_0(trained, tmp_path):
    run_dir, frame = trained
    sample = frame.sample(600, random_state=1)
    sample.to_csv(tmp_path / "new.csv", index=False)
    report = monitor(run_dir, tmp_path / "new.csv", MonitorConfig(max_drifted_fraction=0.05))
    assert not report.data_drift and report.drifted_fraction <= 0.05 and report.label and not report.label.drifted
    result = subprocess.run([sys.executable, "-m", "stoker", "monitor", str(run_dir), "--data", str(tmp_path / "new.csv"),
                             "--json"], capture_output=True, text=True, timeout=120)
    # The run's own config (max_drifted_fraction 0) decides here: a few noisy pixels may flag.
    assert result.returncode in (0, 3), result.stderr
    assert json.loads(result.stdout)["rows"] == 600


def test_shifted_features_labels_and_degraded_metrics_exit_3(trained, tmp_path):
    run_dir, frame = trained
    shifted = frame.copy()
    shifted["pixel_3_3"] = 16 - shifted["pixel_3_3"]  # inverted strokes in one pixel
    shifted = shifted[shifted["target"] < 3]  # only three of ten classes
    shifted.to_csv(tmp_path / "shifted.csv", index=False)
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.80, "loss": 0.21}))
    result = subprocess.run(
        [sys.executable, "-m", "stoker", "monitor", str(run_dir), "--data", str(tmp_path / "shifted.csv"),
         "--metrics", str(tmp_path / "metrics.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    out = result.stdout
    assert "DRIFT pixel_3_3" in out and "label target" in out and "DRIFT" in out.split("label target")[1].splitlines()[0]
    assert "DEGRADED accuracy: test 0.9500 -> new 0.8000" in out and "ok loss" in out
    assert out.strip().endswith("BREACH: data drift, degradation")


def test_schema_mismatch_is_a_user_error_naming_the_column(trained, tmp_path):
    run_dir, frame = trained
    frame.drop(columns=["pixel_2_5"]).to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(UserError, match="missing.csv: column 'pixel_2_5' is missing"):
        monitor(run_dir, tmp_path / "missing.csv", MonitorConfig())
    bad = frame.astype({"pixel_0_2": str})
    bad.loc[bad.index[0], "pixel_0_2"] = "dark"
    bad.to_csv(tmp_path / "text.csv", index=False)
    result = subprocess.run([sys.executable, "-m", "stoker", "monitor", str(run_dir), "--data", str(tmp_path / "text.csv")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("stoker: error: ") and "column 'pixel_0_2' holds non-numeric values, but it was numeric" in result.stderr
