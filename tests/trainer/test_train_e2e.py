"""Real DeepSpeed trainings: 2 Ray Train workers, gloo, on the session's local Ray cluster."""

import json

import pytest
import yaml

from stoker.cli import main
from stoker.cluster.registry import Registry
from stoker.config import parse_config
from stoker.datasets.manifest import Manifest
from stoker.trainer.run import train
from tests.conftest import best_epoch_of, write_config

pytestmark = pytest.mark.slow


def make_run(base, tmp_path, name, train=None, **sections):
    config = dict(base, name=name, storage=str(tmp_path / "runs"), **sections)
    if train:
        config["train"] = {**base["train"], **train}
    return parse_config(config, "test")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_zero2_two_workers_learns_digits_and_writes_the_run_dir(ray_cluster, prepared, tmp_path):
    run = make_run(prepared, tmp_path, "zero2", train={"epochs": 6})
    seen = []
    result = train(run, progress=seen.append)

    assert result.test["accuracy"] >= 0.9, result.test
    assert set(result.test) == {"accuracy", "precision", "recall", "f1", "roc_auc", "loss"}
    run_dir = result.run_dir
    assert [r["epoch"] for r in lines(run_dir / "metrics.jsonl")] == list(range(6))
    assert [r["epoch"] for r in seen] == list(range(6))
    # Where each pass went (stoker.trainer.timing): four parts that sum to the pass, each real.
    for record in lines(run_dir / "metrics.jsonl"):
        parts = [record[f"time_{p}_s"] for p in ("wait", "compute", "step", "other")]
        assert all(p >= 0 for p in parts) and parts[1] > 0 and parts[2] > 0, record
        assert sum(parts) == pytest.approx(record["epoch_time_s"], rel=0.05), record
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["test"] == result.test and final["metric"] == "val_accuracy"
    # The ranking rule: best val_accuracy, on a tie the lower val_loss, then the earlier epoch.
    assert final["best_epoch"] == best_epoch_of(seen)
    manifest = Manifest.read(prepared["data"]["output"])
    assert json.loads((run_dir / "dataset.json").read_text())["source_fingerprint"] == manifest.source_fingerprint
    # samples/s counts the rows trained, a short last batch as it is: Ray's equal shards of the
    # training split (the remainder dropped) over the pass's time.
    trained_rows = manifest.splits["train"]["rows"] // 2 * 2
    for record in lines(run_dir / "metrics.jsonl"):
        assert record["samples_per_s"] * record["epoch_time_s"] == pytest.approx(trained_rows, rel=1e-6), record
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 64
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["name"] == "zero2"

    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(checkpoints) <= 2
    files = {p.name for p in checkpoints[-1].rglob("*") if p.is_file()}
    # Each rank saved its own ZeRO-2 optimizer shard into the one reported checkpoint.
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert "stoker_state.json" in files


def test_zero3_bf16_trains(ray_cluster, prepared, tmp_path):
    run = make_run(prepared, tmp_path, "zero3", train={"epochs": 2, "deepspeed": {"zero_stage": 3, "bf16": True}})
    result = train(run)
    # 10 classes: chance is 0.1; two epochs of ZeRO-3 in bf16 must be far above it.
    assert result.validation["accuracy"] > 0.6, result.validation
    assert json.loads((result.run_dir / "deepspeed_config.json").read_text())["bf16"] == {"enabled": True}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"scaling": {"num_workers": 2, "cpus_per_worker": 1}},
         "stoker: error: scaling.cpus_per_worker: 2 workers x 1 CPUs leave 0 of the cluster's 2 CPUs"),
        ({"train": {"batch_size": 4096}}, "stoker: error: train.batch_size: 4096 is larger than each worker's shard"),
        ({"train": {"metric": "bleu"}}, "stoker: error: train.metric: 'bleu' is not reported for classification"),
        ({"scaling": {"num_workers": 2, "use_gpu": True}},
         "stoker: error: scaling: 2 workers x 1 GPUs need 2 GPUs; the cluster has 0"),
    ],
    ids=["cpu-starvation", "batch-too-big", "unknown-metric", "no-gpus"],
)
def test_cli_refuses_runs_that_cannot_work(ray_cluster, prepared, tmp_path, capsys, change, expected):
    config = dict(prepared, name="refused", storage=str(tmp_path / "runs"), **change)
    code = main(["train", str(write_config(tmp_path, config))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs" / "refused").exists()


def test_resume_on_one_worker_applies_a_perturbed_lr_and_mlflow_logs_each_epoch_once(ray_cluster, prepared, tmp_path,
                                                                                       capsys):
    # What Population Based Training does: resume a trial's checkpoint with a perturbed rate.
    # The same two trainings check a rerun's resume through `stoker train` on fewer workers than
    # the checkpoint was saved by (2 -> 1, ZeRO-2: converted), a changed model refused, and
    # MLflow tracking across the resume (to keep the suite short).
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from stoker.trainer.deepspeed_config import optimizer_steps

    tracking = {"mlflow": True}
    first = train(make_run(prepared, tmp_path, "perturbed", train={"epochs": 1, "tracking": tracking}))
    saved = lines(first.run_dir / "metrics.jsonl")[0]
    assert saved["lr"] == 0.003
    config = dict(prepared, name="perturbed", storage=str(tmp_path / "runs"), scaling={"num_workers": 1},
                  train={**prepared["train"], "epochs": 2, "tracking": tracking,
                         "optimizer": {"name": "adamw", "lr": 1e-9, "weight_decay": 0.05}})
    code = main(["train", str(write_config(tmp_path, config))])
    assert code == 0, capsys.readouterr().err
    records = lines(first.run_dir / "metrics.jsonl")
    # Rerunning the name resumed from the latest checkpoint: epoch 0 is not trained again, and
    # the best epoch over both is the ranking rule's.
    assert [r["epoch"] for r in records] == [0, 1]
    final = json.loads((first.run_dir / "final_metrics.json").read_text())
    assert final["best_epoch"] == best_epoch_of(records)
    resumed = records[1]
    assert resumed["epoch"] == 1 and resumed["lr"] == 1e-9
    assert resumed["resume_changes"] == ["train.optimizer.weight_decay: 0 -> 0.05", "train.optimizer.lr: 0.003 -> 1e-09"]
    # The optimizer really steps with it: at 1e-9 an epoch leaves the weights, and so the
    # validation loss, where epoch 0 left them (at the checkpoint's 0.003 it would drop): the
    # one worker resumed from the two workers' weights.
    assert resumed["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-5)
    # The resumed epoch's rows all went to the one worker: its steps are a whole split's.
    rows, run = Manifest.read(prepared["data"]["output"]).splits["train"]["rows"], parse_config(config, "test")
    assert saved["global_step"] == optimizer_steps(rows, 2, run.train)
    assert resumed["global_step"] - saved["global_step"] == optimizer_steps(rows, 1, run.train)
    checkpoints = sorted(first.run_dir.glob("checkpoint_*"))
    assert (checkpoints[0] / "consolidated").is_dir()  # the conversion's record, kept beside the original
    # The resize is in the records, the registry row and `stoker runs list`.
    assert [r["world_size"] for r in records] == [2, 1]
    [row] = Registry(f"sqlite:///{tmp_path / 'runs' / 'registry.db'}").runs(name="perturbed")
    assert row.metrics["scaling"] == {"workers": 1, "resizes": [{"epoch": 1, "workers_from": 2, "workers_to": 1}],
                                      "preemptions": []}
    capsys.readouterr()
    assert main(["runs", "list", "--storage", str(tmp_path / "runs")]) == 0
    header, listed = capsys.readouterr().out.splitlines()
    assert listed[header.index("WORKERS"):].split()[0] == "2>1"  # the table's columns are aligned

    # A model that no longer matches the checkpoint: one line naming the key, nothing changed.
    before = sorted((p, p.stat().st_mtime_ns) for c in checkpoints for p in c.rglob("*"))
    metrics = (first.run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    changed = {**config, "model": {"name": "mlp", "hidden": [32]}, "train": {**config["train"], "epochs": 3}}
    code = main(["train", str(write_config(tmp_path, changed))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stoker: error: model: run perturbed was trained with another model"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted((p, p.stat().st_mtime_ns) for c in checkpoints for p in c.rglob("*")) == before
    assert (first.run_dir / "metrics.jsonl").read_text() == metrics

    client = MlflowClient(f"sqlite:///{first.run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("stoker").experiment_id])
    assert run.info.run_id == (first.run_dir / "mlflow_run_id").read_text().strip()
    assert run.data.params["train.optimizer.lr"] == "0.003"  # the config the run started with
    assert run.data.params["scaling.num_workers"] == "2"
    # Rank 0's numbers, once per epoch (two workers logging would double every step), and the
    # resumed run continued the same MLflow run without repeating epoch 0.
    for key in ("val_loss", "val_accuracy", "lr", "train_loss"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(logged) == [(r["epoch"], pytest.approx(r[key])) for r in records], key
