"""`stoker dashboard`: the server over real files (a search's log, a run's records), its bad
input as the CLI says it, and the live view in a real browser while a real search runs."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from stoker.cli import main
from stoker.cluster.dashboard import serve
from stoker.trainer.run_dir import Records
from stoker.tune.search_log import LOG_FILE
from tests.conftest import write_config
from tests.ports import free_port

SPACE = {"train.optimizer.lr": {"dist": "loguniform", "low": 1e-4, "high": 0.1}}


def _event(log, **event) -> None:
    with log.open("a") as handle:
        handle.write(json.dumps({"t": time.time(), **event}) + "\n")


def _search(root, name="demo-tune"):
    experiment = root / name
    experiment.mkdir(parents=True)
    (experiment / "stoker_experiment.json").write_text("{}")
    log = experiment / LOG_FILE
    _event(log, event="search", name=name, metric="val_accuracy", mode="max", epochs=3, scheduler="asha", space=SPACE)
    _event(log, event="start", trial="t1", params={"train.optimizer.lr": 0.01})
    _event(log, event="result", trial="t1", epoch=1, value=0.5)
    return log


def _run(root, name="digits"):
    records = Records(root / name)
    records.directory.mkdir(parents=True)
    records.write_config({"name": name, "train": {"epochs": 10}})
    records.metrics_path.write_text("".join(json.dumps({"epoch": e, "epoch_time_s": 2.0, "samples_per_s": 1500.0}) + "\n"
                                            for e in range(4)))


def _get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.status, response.read()


def _until(check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        time.sleep(0.2)
    return check()


def test_the_server_shows_searches_and_runs_and_follows_a_search_as_its_log_grows(tmp_path):
    log = _search(tmp_path)
    _run(tmp_path)
    _run(tmp_path, "finished")
    # As a run writes it (stoker.trainer.run_dir.FinalMetrics).
    Records(tmp_path / "finished").write_final({"metric": "val_accuracy", "best_epoch": 3,
                                                "validation": {"accuracy": 0.97}, "test": {"accuracy": 0.96},
                                                "test_details": {"confusion_matrix": [[1, 0], [0, 1]]}})
    port, ready, stop = free_port(), threading.Event(), threading.Event()
    server = threading.Thread(target=serve, args=(tmp_path, "127.0.0.1", port), daemon=True,
                              kwargs={"refresh_s": 0.2, "ready": ready, "stop": stop})
    server.start()
    try:
        assert ready.wait(60)
        overview = json.loads(_get(port, "/stoker/api/overview")[1])
        [search], [run, finished] = overview["searches"], overview["runs"]
        assert search["name"] == "demo-tune" and search["study"] == 0
        # The run's place: epoch 4 of 10 (0-based 3), its samples/s, 6 epochs left at 2 s each.
        assert run["progress"] == {"epoch": 3, "epochs": 10, "samples_per_s": 1500.0, "eta_s": 12.0}
        assert not run["finished"] and run["best"] == {}
        # A finished run shows its scores, not the confusion matrix final_metrics.json also holds.
        assert finished["finished"] and finished["best"] == {"val_accuracy": 0.97, "test_accuracy": 0.96}
        assert b"stoker dashboard" in _get(port, "/stoker")[1]
        assert _get(port, "/tensorboard/")[0] == 200
        trials = json.loads(_get(port, "/api/studies/0")[1])["trials"]
        assert [t["state"] for t in trials] == ["Running"]

        _event(log, event="end", trial="t1", status="done", stopped_by=None, value=0.9, epochs=3)
        _event(log, event="start", trial="t2", params={"train.optimizer.lr": 0.001})

        def states():
            trials = json.loads(_get(port, "/api/studies/0")[1])["trials"]
            return [t["state"] for t in trials] if len(trials) == 2 and trials[0]["state"] != "Running" else None
        assert _until(states, 10) == ["Complete", "Running"]
    finally:
        stop.set()
        server.join(30)
    assert not server.is_alive()


def _dashboard(capsys, *args: str) -> tuple[int, str]:
    code = main(["dashboard", *args])
    return code, capsys.readouterr().err


def test_bad_input_says_in_one_line_what_is_wrong(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, err = _dashboard(capsys, "empty")
    assert code == 2 and err.count("\n") == 1 and "empty: no runs or searches here" in err, err

    code, err = _dashboard(capsys)  # the default PATH, `runs`, is not there
    assert code == 2 and "runs: no such storage directory" in err, err

    _search(tmp_path / "runs")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _dashboard(capsys, "runs", "--port", str(port), "--no-tensorboard")
    assert code == 2 and f"--port: port {port} on 127.0.0.1 is in use" in err, err
    assert "Traceback" not in err
    assert _dashboard(capsys, "runs", "--port", "0")[0] == 2


@pytest.mark.slow
def test_a_trial_finishing_while_the_page_is_open_appears_without_a_reload(ray_cluster, prepared, tmp_path):
    """A real search in its own process, `stoker dashboard runs` as typed from the directory the
    run config names `runs` in, and Debian's Chromium through Playwright."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no `chromium` on PATH (the Makefile installs Debian's where it runs as root with apt)")
    from playwright.sync_api import sync_playwright

    from tests.tune.conftest import start_tune
    from tests.tune.test_tune_e2e import small

    tune = {"num_samples": 3, "max_concurrent_trials": 1, "searcher": "random", "seed": 0, "space": SPACE}
    path = write_config(tmp_path, small(prepared, tmp_path, "live", tune, epochs=12))
    driver = start_tune(path)
    port, dashboard = free_port(), None
    try:
        log = tmp_path / "runs" / "live-tune" / LOG_FILE
        assert _until(lambda: log.is_file() and '"event": "start"' in log.read_text(), 300), "no trial started"
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        dashboard = subprocess.Popen([sys.executable, "-m", "stoker", "dashboard", "runs", "--port", str(port)],
                                     cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        assert _until(lambda: _answers(port), 120), "the dashboard never answered"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/stoker")
            page.click("#searches tbody tr a")  # the search's study, in optuna-dashboard
            page.wait_for_url("**/dashboard/studies/0")
            page.goto(f"http://127.0.0.1:{port}/dashboard/studies/0/trials")  # its trials list
            page.wait_for_selector("text=Trial 0")
            finished_before = page.locator("text=Complete").count()
            # No reload from here: the page's own live update has to bring the finished trial.
            grew = _until(lambda: page.locator("text=Complete").count() > finished_before, 300)
            shown = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "trials.png"))
            browser.close()
        assert grew, f"no trial finished on the page ({finished_before} before):\n{shown[:2000]}"
        # The selected trial's details: how stoker ran it, beside Optuna's state.
        assert "tune_trial" in shown and "Running" in shown, shown[:2000]
    finally:
        os.killpg(driver.pid, 9)
        driver.wait(30)
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(30)


def _answers(port: int) -> bool:
    try:
        return _get(port, "/stoker/api/overview")[0] == 200
    except OSError:
        return False
