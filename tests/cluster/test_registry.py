"""The runs registry on a real SQLite file: records, lookups, comparisons, model versions."""

import json
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest
import yaml

from stoker.cluster.registry import (
    Registry,
    config_hash,
    git_state,
    record_run,
    resolve_url,
)
from stoker.errors import UserError
from stoker.trainer.checkpoints import STATE_FILE
from stoker.trainer.run_spec import parse_run
from tests.conftest import REPO, run_config, write_config


def fake_run_dir(root, name="r1", lr=0.003, test_acc=0.9, fingerprint="sha256:abc", finished=True):
    """A run directory shaped like trainer.run writes it (config, dataset, metrics, checkpoints)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    # The run's whole typed config, as the trainer writes it.
    config = parse_run(run_config(root / "d.csv", "p", root, name=name, train={
        "epochs": 2, "batch_size": 32, "optimizer": {"name": "adamw", "lr": lr}}), "run.yaml").model_dump(mode="json")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "dataset.json").write_text(json.dumps({"path": "/data/p", "source_fingerprint": fingerprint}))
    lines = []
    for epoch in (1, 2):
        checkpoint = run_dir / f"checkpoint_{epoch:06d}"
        checkpoint.mkdir()
        (checkpoint / STATE_FILE).write_text(json.dumps({"epoch": epoch}))  # what export/register read
        lines.append(json.dumps({"epoch": epoch, "val_accuracy": 0.5 + epoch / 10, "checkpoint": str(checkpoint)}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (run_dir / "final_metrics.json").write_text(json.dumps({
            "run": name, "metric": "val_accuracy", "best_epoch": 1,
            "validation": {"accuracy": 0.6}, "test": {"accuracy": test_acc}, "source_fingerprint": fingerprint,
        }))
    return run_dir


def record(run_dir, status, **fields):
    """`record_run` as the CLI calls it, with the run's typed config (read back from config.yaml)."""
    run = parse_run(yaml.safe_load((run_dir / "config.yaml").read_text()), "config.yaml")
    return record_run(run_dir, status, run, **fields)


def test_record_run_captures_what_made_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("STOKER_REGISTRY_URL", raising=False)
    monkeypatch.chdir(REPO)  # a git working tree
    run_dir = fake_run_dir(tmp_path)
    run_id = record(run_dir, "succeeded")
    # The default registry is SQLite in the run's storage, readable by any SQLite client.
    rows = sqlite3.connect(tmp_path / "registry.db").execute(
        "select id, name, status, data_fingerprint, checkpoint, git_commit from runs").fetchall()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    # Best epoch is 1, so its checkpoint (not the latest) is the model's.
    assert rows == [(run_id, "r1", "succeeded", "sha256:abc", str(run_dir / "checkpoint_000001"), head)]
    found = Registry(resolve_url(None, tmp_path)).find_run("r1")
    assert found.metrics["test"] == {"accuracy": 0.9}
    assert found.score == pytest.approx(0.6) and found.metric == "val_accuracy"
    assert found.config_hash == config_hash(yaml.safe_load((run_dir / "config.yaml").read_text()))


def test_a_resumed_run_keeps_its_id_and_a_fresh_one_gets_a_new_one(tmp_path):
    run_dir = fake_run_dir(tmp_path, finished=False)
    first = record(run_dir, "running")
    assert record(run_dir, "failed", error="boom") == first
    registry = Registry(resolve_url(None, tmp_path))
    assert [(r.id, r.status, r.error) for r in registry.runs()] == [(first, "failed", "boom")]
    # `stoker train --fresh` deletes the run directory, and with it the id.
    shutil.rmtree(run_dir)
    second = record(fake_run_dir(tmp_path), "succeeded")
    assert second != first
    assert {r.id: r.status for r in registry.runs()} == {first: "failed", second: "succeeded"}
    assert registry.find_run("r1").id == second  # a name means the latest run of that name


def test_config_hash_ignores_the_name_but_not_the_recipe():
    base = {"name": "a", "storage": "x", "train": {"lr": 1}}
    assert config_hash(base) == config_hash({**base, "name": "b", "storage": "y"})
    assert config_hash(base) != config_hash({**base, "train": {"lr": 2}})


def test_git_state_outside_a_repo_uses_the_commit_stoker_submit_passed(tmp_path, monkeypatch):
    monkeypatch.delenv("STOKER_GIT_COMMIT", raising=False)
    assert git_state(tmp_path).commit is None
    monkeypatch.setenv("STOKER_GIT_COMMIT", "abc123-dirty")
    state = git_state(tmp_path)
    assert (state.commit, state.dirty) == ("abc123", True)


def test_model_versions_number_up_and_promotion_archives_the_previous(tmp_path):
    runs = [fake_run_dir(tmp_path / "s", n) for n in ("a", "b")]
    ids = [record(r, "succeeded") for r in runs]
    registry = Registry(resolve_url(None, tmp_path / "s"))
    v1 = registry.register_model(ids[0], "digits", stage="production")
    v2 = registry.register_model("b", "digits")
    assert (v1.version, v2.version, v2.stage) == (1, 2, "none")
    registry.set_stage("digits", 2, "production")
    assert [(v.version, v.stage) for v in registry.models("digits")] == [(1, "archived"), (2, "production")]
    assert registry.models("digits")[1].checkpoint.endswith("checkpoint_000001")
    with pytest.raises(UserError, match="has no version 7"):
        registry.set_stage("digits", 7, "staging")


def test_concurrent_registrations_get_distinct_versions(tmp_path):
    run_id = record(fake_run_dir(tmp_path), "succeeded")
    url = resolve_url(None, tmp_path)
    versions, errors = [], []

    def register():
        try:
            versions.append(Registry(url).register_model(run_id, "m", new_version=True).version)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(versions) == [1, 2, 3, 4, 5, 6]


def test_failed_runs_cannot_become_models_and_unknown_runs_are_named(tmp_path):
    run_id = record(fake_run_dir(tmp_path, finished=False), "failed", error="x")
    registry = Registry(resolve_url(None, tmp_path))
    with pytest.raises(UserError, match=f"run {run_id} \\(r1\\) is failed"):
        registry.register_model(run_id, "m")
    with pytest.raises(UserError, match="run 'nope' is not in the registry sqlite:///"):
        registry.find_run("nope")


def test_a_run_is_found_by_its_directory_as_export_takes_it(tmp_path, monkeypatch):
    run_id = record(fake_run_dir(tmp_path, name="digits-demo"), "succeeded")
    registry = Registry(resolve_url(None, tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert registry.find_run(f"{tmp_path.name}/digits-demo").id == run_id  # relative, as typed
    assert registry.find_run(str(tmp_path / "digits-demo") + "/").id == run_id
    assert registry.register_model(f"{tmp_path.name}/digits-demo", "digits").version == 1
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UserError, match="is not in the registry"):
        registry.find_run(f"{tmp_path.name}/elsewhere")


def test_registry_url_that_cannot_be_opened_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cluster.registry.url: cannot open registry sqlite:///"):
        Registry(f"sqlite:///{tmp_path / 'file' / 'sub' / 'r.db'}")
    with pytest.raises(UserError, match="cannot open registry postgresql://u:\\*\\*\\*@"):
        Registry("postgresql://u:hunter2@127.0.0.1:1/db")


def stoker(*args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def test_runs_and_models_cli(tmp_path):
    a = record(fake_run_dir(tmp_path, "a", lr=0.003, test_acc=0.9), "succeeded")
    b = record(fake_run_dir(tmp_path, "b", lr=0.01, test_acc=0.8, fingerprint="sha256:def"), "succeeded")
    storage = ["--storage", str(tmp_path)]
    listing = stoker("runs", "list", "--json", *storage)
    assert listing.returncode == 0, listing.stderr
    assert [json.loads(line)["id"] for line in listing.stdout.splitlines()] == [b, a]
    show = json.loads(stoker("runs", "show", "a", *storage).stdout)
    assert show["id"] == a and show["config"]["train"]["optimizer"]["lr"] == 0.003
    compare = stoker("runs", "compare", "a", "b", *storage).stdout.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in compare[1:]}
    assert rows["config.train.optimizer.lr"] == ["0.003", "0.01"]
    assert rows["data_fingerprint"] == ["sha256:abc", "sha256:def"]
    assert rows["metrics.test.accuracy"] == ["0.9000", "0.8000"]
    assert "config.data.output" not in rows  # equal keys are not shown
    assert stoker("models", "register", "a", "--name", "digits", *storage).stdout.startswith(
        f"registered digits version 1 (stage none) from run {a}")
    missing = stoker("runs", "show", "zzz", *storage)
    assert missing.returncode == 2 and missing.stderr.startswith("stoker: error: run 'zzz' is not in the registry")


def test_runs_are_found_where_train_recorded_them_and_a_run_registers_once(tmp_path):
    import os

    shared = tmp_path / "shared"
    a = record(fake_run_dir(shared, "a"), "succeeded")
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    config = run_config(tmp_path / "d.csv", tmp_path / "p", shared, name="a")
    write_config(project, config)
    env = {k: v for k, v in os.environ.items() if k != "STOKER_REGISTRY_URL"}
    database = (shared / "registry.db").resolve()

    # From another directory the default registry is not there: said, not an empty table.
    lost = stoker("runs", "list", env=env, cwd=elsewhere)
    assert lost.returncode == 2 and lost.stderr.count("\n") == 1, lost.stderr
    assert lost.stderr.startswith(f"stoker: error: no runs registry at {elsewhere / 'runs' / 'registry.db'} "
                                  "(from the default --storage runs); ")
    assert "--config CONFIG" in lost.stderr and not (elsewhere / "runs").exists()
    # The config that trained the run leads to its registry, and the listing names it.
    found = stoker("runs", "list", "--json", "--config", str(project / "run.yaml"), env=env, cwd=elsewhere)
    assert found.returncode == 0, found.stderr
    assert [json.loads(line)["id"] for line in found.stdout.splitlines()] == [a]
    assert found.stderr == f"registry: sqlite:///{database}\n"
    by_env = stoker("models", "list", env={**env, "STOKER_REGISTRY_URL": f"sqlite:///{database}"}, cwd=elsewhere)
    assert by_env.returncode == 0 and by_env.stderr == f"registry: sqlite:///{database}\n"

    where = ["--config", str(project / "run.yaml")]
    first = stoker("models", "register", "a", "--name", "digits", *where, env=env, cwd=elsewhere)
    assert first.stdout.startswith(f"registered digits version 1 (stage none) from run {a}"), first.stderr
    again = stoker("models", "register", "a", "--name", "digits", "--stage", "staging", *where, env=env, cwd=elsewhere)
    assert again.returncode == 0
    assert again.stdout.startswith(f"run {a} is already digits version 1 (stage none); pass --new-version")
    assert "stoker models stage digits 1 staging" in again.stdout
    assert [v.version for v in Registry(f"sqlite:///{database}").models("digits")] == [1]
    extra = stoker("models", "register", "a", "--name", "digits", "--new-version", *where, env=env, cwd=elsewhere)
    assert extra.stdout.startswith(f"registered digits version 2 (stage none) from run {a}")
    # --debug is accepted after the verb too.
    debug = stoker("runs", "show", "zzz", *where, "--debug", env=env, cwd=elsewhere)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "run 'zzz' is not in the registry" in debug.stderr


def test_registry_url_in_the_config_must_not_carry_a_password():
    from stoker.cluster.config import RegistryConfig

    with pytest.raises(ValueError, match="carries a password; set it in STOKER_REGISTRY_URL"):
        RegistryConfig(url="postgresql://u:secret@db/stoker")
    assert RegistryConfig(url="postgresql://u@db/stoker").url


def test_a_failed_run_that_later_succeeds_loses_its_old_error(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        registry.upsert_run("x", name="x", status="failed", error="worker died")
        registry.upsert_run("x", status="running", error=None)
        assert registry.find_run("x").error is None
        registry.upsert_run("x", status="failed", error="again")
        registry.upsert_run("x", status="stopped")  # no error given: the last one stays
        assert registry.find_run("x").error == "again"
    finally:
        registry.close()


def test_a_running_run_is_listed_with_its_epoch_rate_and_time_left(tmp_path):
    run_dir = fake_run_dir(tmp_path, "live")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "train": {**config["train"], "epochs": 10}}))
    # Epochs 0-3 done: the ETA is the 6 epochs left times the mean of the last five epochs' time.
    lines = [{"epoch": e, "epoch_time_s": 10.0 + e, "validation_s": 1.0, "samples_per_s": 1200.0 + e} for e in range(4)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    record(run_dir, "running")
    listing = stoker("runs", "list", "--storage", str(tmp_path))
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()
    assert "PROGRESS" in header
    assert "epoch 4/10, 1203 samples/s, ETA 1m15s" in row  # 6 x mean(11, 12, 13, 14) = 75 s
    as_json = json.loads(stoker("runs", "list", "--json", "--storage", str(tmp_path)).stdout)
    assert as_json["progress"] == {"epoch": 3, "epochs": 10, "samples_per_s": 1203.0, "eta_s": 75.0}

    record(run_dir, "succeeded")  # finished: no progress shown
    assert json.loads(stoker("runs", "list", "--json", "--storage", str(tmp_path)).stdout)["progress"] is None


def test_an_unfinished_run_keeps_its_workers_and_resizes(tmp_path):
    run_dir = fake_run_dir(tmp_path, "grown", finished=False)
    sizes = [2, 1, 1, 2]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "world_size": w}) + "\n"
                                                   for e, w in enumerate(sizes)))
    record(run_dir, "stopped", error="interrupted")
    [row] = Registry(resolve_url(None, tmp_path)).runs(name="grown")
    assert row.metrics == {"scaling": {"workers": 2, "preemptions": [], "resizes": [
        {"epoch": 1, "workers_from": 2, "workers_to": 1}, {"epoch": 3, "workers_from": 1, "workers_to": 2}]}}
