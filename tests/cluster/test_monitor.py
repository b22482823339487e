"""`stoker monitor` on real prepared data and a real trained run: in-distribution data passes,
shifted features, a changed schema and a model that no longer fits its data are flagged with the
documented exit codes."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from stoker.cli import main
from stoker.cluster.config import MonitorConfig
from stoker.cluster.monitor import monitor, numeric_drift, psi
from stoker.errors import UserError
from tests.conftest import copy_run


@pytest.fixture(scope="module")
def unlabelled_run(prepared, digits_csv, tmp_path_factory):
    """A run directory that points at the session's prepared digits (as trainer.run writes
    it), without a model: enough for drift on data without labels."""
    run_dir = tmp_path_factory.mktemp("monitor") / "runs" / "test-run"
    run_dir.mkdir(parents=True)
    (run_dir / "dataset.json").write_text(json.dumps({"path": prepared["data"]["output"]}))
    # The whole config, as a run records it: `stoker monitor` validates the record once.
    config = dict(prepared, name="test-run", cluster={"monitor": {"psi": 0.2}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir, pd.read_csv(digits_csv).drop(columns=["target"])


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


def test_unlabelled_data_of_the_same_distribution_passes_without_scoring(unlabelled_run, tmp_path):
    run_dir, frame = unlabelled_run
    frame.to_csv(tmp_path / "new.csv", index=False)
    report = monitor(run_dir, tmp_path / "new.csv", MonitorConfig())
    # The training split is 70% of these rows, encoded by the same transform: nothing drifts.
    assert report.rows == len(frame) and not report.data_drift and report.drifted_fraction == 0
    assert report.label is None and report.metrics == [] and report.model == ""
    assert max(f.psi for f in report.features) < 0.05


def test_shifted_features_exit_3(unlabelled_run, tmp_path):
    run_dir, frame = unlabelled_run
    shifted = frame.copy()
    shifted["pixel_3_3"] = 16 - shifted["pixel_3_3"]  # inverted strokes in one pixel
    shifted.to_csv(tmp_path / "shifted.csv", index=False)
    result = subprocess.run([sys.executable, "-m", "stoker", "monitor", str(run_dir), "--data", str(tmp_path / "shifted.csv")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "DRIFT pixel_3_3" in result.stdout and "features drifted: 1/64" in result.stdout
    assert result.stdout.strip().endswith("BREACH: data drift")


def test_schema_mismatch_is_a_user_error_naming_the_column(unlabelled_run, tmp_path):
    run_dir, frame = unlabelled_run
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


@pytest.mark.slow
def test_rays_driver_side_messages_go_to_stderr_not_stdout(ray_cluster, capsys):
    from stoker.ray_internals import print_as_ray

    capsys.readouterr()
    print_as_ray(["WARNING: 3 PYTHON worker processes have been started on node ..."])
    captured = capsys.readouterr()
    assert captured.out == "" and "WARNING: 3 PYTHON worker processes" in captured.err and "(raylet)" in captured.err


def test_the_runs_model_is_scored_on_labelled_data(finished_run, digits_csv, tmp_path, capsys):
    from stoker.trainer.export import export_run

    # The session's finished run (tests/conftest.py), copied: this test exports into it.
    run_dir = copy_run(finished_run.run_dir, tmp_path)
    test_metrics = json.loads((run_dir / "final_metrics.json").read_text())["test"]
    frame = pd.read_csv(digits_csv)

    def run_monitor(frame: pd.DataFrame, name: str) -> tuple[int, dict, str]:
        frame.to_csv(tmp_path / name, index=False)
        capsys.readouterr()  # whatever training printed
        code = main(["monitor", str(run_dir), "--data", str(tmp_path / name), "--json"])
        out = capsys.readouterr().out
        # stdout is exactly one JSON document: Ray's own lines (a raylet's WARNING) go to stderr.
        as_json = json.loads(out)
        assert isinstance(as_json, dict) and out.count("\n") == 1, out
        main(["monitor", str(run_dir), "--data", str(tmp_path / name)])
        return code, as_json, capsys.readouterr().out

    # Clean: the raw rows the run was prepared from; the model scores about its test metrics.
    code, report, text = run_monitor(frame, "clean.csv")
    assert code == 0, text
    scored = {m["metric"]: m for m in report["metrics"]}
    assert {"loss", "accuracy", "f1"} <= set(scored) and report["model"] == "best checkpoint"
    assert scored["accuracy"]["test"] == test_metrics["accuracy"]
    assert scored["accuracy"]["new"] > 0.8 and not report["degraded"] and not report["data_drift"]
    assert "ok accuracy: test" in text and text.strip().endswith("OK")
    clean_accuracy = scored["accuracy"]["new"]

    # Degraded: the same pixels and the same label distribution, but the labels no longer
    # belong to the images. No statistic of the data can see this; only scoring the model can.
    shuffled = frame.assign(target=frame["target"].sample(frac=1, random_state=0).to_numpy())
    code, report, text = run_monitor(shuffled, "shuffled.csv")
    assert code == 3, text
    scored = {m["metric"]: m for m in report["metrics"]}
    assert scored["accuracy"]["new"] < 0.3 and scored["accuracy"]["degraded"] and scored["loss"]["degraded"]
    assert not report["data_drift"] and not report["label"]["drifted"]
    assert "DEGRADED accuracy: test" in text and text.strip().endswith("BREACH: degradation")

    # A label the model never saw is counted and left out of the scores, not fed to the loss.
    extra = pd.concat([frame, frame.head(5).assign(target=10)])
    code, report, text = run_monitor(extra, "extra.csv")
    assert report["unknown_labels"] == 5 and report["rows"] == len(frame) + 5
    assert "label the model never saw (not scored): 5" in text

    # With an export, that is the model scored; its weights are the best checkpoint's.
    export_run(run_dir)
    code, report, _ = run_monitor(frame, "clean.csv")
    assert code == 0 and report["model"] == "export"
    assert {m["metric"]: m["new"] for m in report["metrics"]}["accuracy"] == pytest.approx(clean_accuracy, abs=1e-6)
