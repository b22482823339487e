"""`stoker train` around the training itself: a finished run is not started again, a run
whose driver died is not `running` for ever, Ctrl-C/SIGTERM stop with exit 130 and a resume
hint (the last one end to end, in its own process and Ray cluster)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stoker.cli import main
from stoker.cluster.registry import Registry, resolve_url
from stoker.trainer import checkpoints as ckpt
from stoker.trainer.run_dir import Records
from tests.conftest import REPO, write_config


def test_rerunning_a_finished_run_says_so_without_starting_ray(prepared, tmp_path, capsys, monkeypatch):
    import stoker.cluster.connect

    def no_cluster(*args, **kwargs):
        raise AssertionError("a finished run must not start Ray")

    monkeypatch.setattr(stoker.cluster.connect, "connect_embedded", no_cluster)
    run_dir = tmp_path / "runs" / "done"
    run_dir.mkdir(parents=True)
    (run_dir / "final_metrics.json").write_text(json.dumps({
        "metric": "val_accuracy", "best_epoch": 1, "epochs_trained": 2, "stopped_early": False,
        "test": {"accuracy": 0.95, "loss": 0.2}, "validation": {"accuracy": 0.9}}))
    config = write_config(tmp_path, dict(prepared, name="done", storage=str(tmp_path / "runs")))
    started = time.perf_counter()
    assert main(["train", str(config)]) == 0
    assert time.perf_counter() - started < 5
    out = capsys.readouterr().out
    assert out.startswith("run done already finished: 2 epochs, best epoch 1 (by val_accuracy); test metrics: "
                          "accuracy 0.9500, loss 0.2000\n")
    assert "--fresh trains it again" in out


@pytest.mark.slow
def test_sigterm_or_ctrl_c_stops_with_130_a_resume_hint_and_status_stopped(prepared, tmp_path, monkeypatch):
    # Its own process and Ray cluster: Ctrl-C reaches `stoker train` as from a terminal.
    monkeypatch.delenv("STOKER_REGISTRY_URL", raising=False)
    storage = tmp_path / "runs"
    config = write_config(tmp_path, dict(prepared, name="interrupted", storage=str(storage),
                                         train={**prepared["train"], "epochs": 200}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:  # a file, not a pipe: Ray's lines must never block the child
        process = subprocess.Popen([sys.executable, "-m", "stoker", "train", str(config)], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=sink, text=True)
        try:
            for line in process.stdout:
                if line.startswith("epoch   1"):
                    break
            # SIGTERM, as a scheduler stops a job (Ctrl-C's SIGINT takes the same path): Ray's
            # own SIGTERM handler, installed by ray.init, used to end the driver at once.
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    err = errors.read_text()
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stoker: interrupted: run interrupted stopped; `stoker train ")
    record = Registry(resolve_url(None, storage)).find_run("interrupted")
    assert record.status == "stopped"
    # The workers checkpointed where they were before the driver went (stoker.trainer.stop_flag),
    # mid-epoch: the next `stoker train` trains the rest of that epoch (tests/cluster/test_drain.py).
    assert "stoker: stopping: the workers save a checkpoint first" in err
    records = Records(storage / "interrupted")
    [stopped] = [e for e in records.events() if e["event"] == "stopped"]
    assert stopped["cause"] == "stop" and 0 < stopped["micro_step"] <= stopped["steps_in_epoch"]
    assert stopped["epoch"] == len(records.metrics())  # the epoch after the last one recorded
    assert last.endswith(f"resumes it at epoch {stopped['epoch']}, step {stopped['micro_step']} of "
                         f"{stopped['steps_in_epoch']}")
    newest = ckpt.local_checkpoints(storage / "interrupted")[0]
    assert ckpt.read_state(newest)["partial"]["epoch"] == stopped["epoch"]


def test_redirected_ray_lines_lose_their_colour_codes():
    import io

    from stoker.commands.train import _Plain

    sink = io.StringIO()
    _Plain(sink).write("\x1b[33m(raylet)\x1b[0m WARNING: 12 PYTHON worker processes\n")
    assert sink.getvalue() == "(raylet) WARNING: 12 PYTHON worker processes\n"
