"""Job submission without a cluster: addresses, tokens, upload limits, the runtime_env, and
the one-line errors a user sees for an unreachable cluster (no Ray needed)."""

import socket
import subprocess
import sys

import pytest

from stoker.cluster import jobs
from stoker.config import parse_config
from stoker.errors import UserError
from tests.conftest import run_config, write_config


def stoker(*args, cwd, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.resolve_address(None, None) is None
    assert jobs.resolve_address("head:8265/") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com")
    assert jobs.resolve_address(None, "http://from-config:8265") == "https://ray.example.com"
    assert jobs.resolve_address("http://cli:8265") == "http://cli:8265"
    with pytest.raises(UserError, match="ray://head:10001 is not a Jobs API address"):
        jobs.resolve_address("ray://head:10001")


def test_token_comes_from_the_environment_only(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs.auth_headers() == {}
    (tmp_path / "token").write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert jobs.auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert jobs.auth_headers() == {"Authorization": "Bearer fromenv"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH: cannot read the token file .*missing"):
        jobs.auth_headers()


def test_runtime_env_carries_config_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-token")
    config = run_config(tmp_path / "d.csv", tmp_path / "p", "/mnt/shared/runs", name="r")
    config["cluster"] = {"submit": {"env_vars": {"NCCL_DEBUG": "INFO"}, "pip": ["einops==0.8.2"]}}
    run = parse_config(config, "run.yaml")
    env = jobs.runtime_env_for(run, tmp_path, "id1", "stoker-r", "abc")
    assert env["working_dir"] == str(tmp_path) and ".git" in env["excludes"] and env["pip"] == ["einops==0.8.2"]
    assert env["env_vars"]["NCCL_DEBUG"] == "INFO" and env["env_vars"]["STOKER_RUN_ID"] == "id1"
    # `stoker jobs stop` leaves the driver time for the workers' stop checkpoint (3 s by default).
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "35"
    assert parse_config(__import__("yaml").safe_load(env["env_vars"]["STOKER_RUN_CONFIG"]), "x") == run
    assert "s3cret-token" not in repr(env)
    with pytest.raises(UserError, match="^cluster.submit.env_vars: MY_TOKEN: looks like a secret; .* \\(run.yaml\\)$"):
        parse_config({**config, "cluster": {"submit": {"env_vars": {"MY_TOKEN": "x"}}}}, "run.yaml")
    with pytest.raises(UserError, match="'torch' is not pinned"):
        parse_config({**config, "cluster": {"submit": {"pip": ["torch"]}}}, "run.yaml")


def test_upload_size_applies_excludes_and_gitignore(tmp_path):
    (tmp_path / "a.py").write_text("x" * 1000)
    (tmp_path / ".gitignore").write_text("data/\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"0" * 100_000)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ckpt.bin").write_bytes(b"0" * 100_000)
    size, files = jobs.upload_size(tmp_path, ["runs"])
    assert (size, files) == (1000 + len("data/\n"), 2)


def test_upload_size_walks_like_rays_own_packaging(tmp_path):
    """Nested ignore files (each relative to its folder), .rayignore, folder-only patterns,
    negation and the config's excludes: the same files as Ray's traversal counts."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files = {
        "train.py": 10, "notes.log": 20, ".gitignore": 0, "pkg/mod.py": 30, "pkg/.gitignore": 0,
        "pkg/cache/x.bin": 40, "pkg/keep.log": 50, "pkg/build": 60, "data/a.csv": 70, "data/.rayignore": 0,
        "data/raw/b.csv": 80, "outputs/c.bin": 90, "deep/er/runs/d.bin": 100,
    }
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    (tmp_path / ".gitignore").write_text("*.log\n")
    (tmp_path / "pkg" / ".gitignore").write_text("cache/\n!keep.log\nbuild/\n")
    (tmp_path / "data" / ".rayignore").write_text("raw\n")
    excludes = ["outputs", "runs/"]

    totals = [0, 0]

    def add(path):
        if path.is_file():
            totals[0] += path.stat().st_size
            totals[1] += 1

    _dir_travel(tmp_path, [_get_excludes(tmp_path, excludes)], add, include_gitignore=True)
    assert jobs.upload_size(tmp_path, excludes) == tuple(totals)
    # train.py, the three ignore files, pkg/mod.py, pkg/build (a file, which `build/` leaves)
    # and data/a.csv. pkg/keep.log stays out: a negation only undoes patterns of its own file,
    # and the root's `*.log` still excludes it.
    assert totals[1] == 7


def test_submission_ids_follow_the_run_name():
    assert jobs.submission_id_for("digits") == "stoker-digits"
    assert jobs.submission_id_for("digits", 3) == "stoker-digits-retry3"


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers: a cluster that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def test_unreachable_and_hanging_clusters_exit_2_naming_address_and_wait(tmp_path, silent_server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    refused = stoker("jobs", "list", "--address", f"127.0.0.1:{closed}", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(
        f"stoker: error: --address: cannot reach the Ray Jobs API at http://127.0.0.1:{closed} (connection failed after ")
    hanging = stoker("jobs", "status", "x", "--timeout", "1.5", cwd=tmp_path,
                     env_extra={"RAY_ADDRESS": f"http://127.0.0.1:{silent_server}"})
    assert hanging.returncode == 2
    assert f"at http://127.0.0.1:{silent_server} (timed out after 1." in hanging.stderr and "of a 1.5s limit" in hanging.stderr


def test_submit_checks_the_upload_size_before_contacting_anyone(tmp_path):
    config = run_config(tmp_path / "d.csv", tmp_path / "p", tmp_path / "runs", name="big")
    config["cluster"] = {"submit": {"max_upload_mb": 0.01}}
    (tmp_path / "blob.bin").write_bytes(b"0" * 50_000)
    write_config(tmp_path, config)
    from stoker.cluster.jobs import submit_run

    with pytest.raises(UserError, match=r"cluster.submit.working_dir: .* is 0.0 MiB in \d+ files after excludes, over "
                                        r"cluster.submit.max_upload_mb \(0.01\)"):
        submit_run(None, parse_config(config, "run.yaml"), tmp_path, "id", None)
    missing = stoker("submit", "run.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "no cluster given; pass --address URL or set RAY_ADDRESS" in missing.stderr


def test_relative_paths_resolve_where_submit_runs_and_absolute_ones_stay(tmp_path):
    config = run_config("data/digits.csv", "prepared/digits", "runs", name="r")
    config["data"]["source"] = ["data/a.csv", "/mnt/shared/b.csv", "s3://bucket/c.csv"]
    config["train"]["tracking"] = {"mlflow_uri": "sqlite:///mlflow/store.db"}
    config["cluster"] = {"registry": {"url": "sqlite:////abs/registry.db"}}
    config["tune"] = {"space": {"train.optimizer.lr": {"dist": "uniform", "low": 0.001, "high": 0.01}},
                      "warm_start": ["runs/old-tune", "s3://bucket/runs/older-tune"]}
    run, changed = jobs.absolute_paths(parse_config(config, "run.yaml"), tmp_path / "clone")
    clone = tmp_path / "clone"
    assert run.storage == str(clone / "runs") and run.data.output == str(clone / "prepared" / "digits")
    assert run.data.source == [str(clone / "data" / "a.csv"), "/mnt/shared/b.csv", "s3://bucket/c.csv"]
    assert run.tune.warm_start == [str(clone / "runs" / "old-tune"), "s3://bucket/runs/older-tune"]
    assert run.train.tracking.mlflow_uri == f"sqlite:///{clone / 'mlflow' / 'store.db'}"
    assert run.cluster.registry.url == "sqlite:////abs/registry.db"
    assert [(p.key, p.written, p.needed) for p in changed] == [
        ("storage", "runs", True), ("data.source[0]", "data/a.csv", False), ("data.output", "prepared/digits", True),
        ("tune.warm_start[0]", "runs/old-tune", True), ("train.tracking.mlflow_uri", "sqlite:///mlflow/store.db", True),
    ]
    # The CLI's own rule for a relative path: the current directory, as `stoker train` reads it.
    assert changed[2].path == str(clone / "prepared" / "digits")


class ProcessJobs:
    """The calls of a Jobs API client that the path probe makes, each job a real subprocess of
    its entrypoint. `elsewhere` maps folders of this machine to the folders that a cluster on
    another machine has at those paths (their own content, not this machine's)."""

    def __init__(self, elsewhere: dict | None = None):
        self.elsewhere = elsewhere or {}
        self.ids: list[str] = []

    def list_jobs(self):
        return []

    def submit_job(self, entrypoint, submission_id, runtime_env):
        import json
        import os

        env = {**os.environ, **runtime_env["env_vars"]}
        checks = json.loads(env[jobs.PROBE_ENV])
        for index, (path, marker) in enumerate(checks):
            for mine, theirs in self.elsewhere.items():
                if path == str(mine) or path.startswith(f"{mine}/"):
                    checks[index] = [str(theirs) + path[len(str(mine)):], marker]
        env[jobs.PROBE_ENV] = json.dumps(checks)
        self.done = subprocess.run(["bash", "-c", entrypoint], env=env, capture_output=True, text=True, timeout=60)
        self.ids.append(submission_id)

    def get_job_info(self, submission_id):
        from types import SimpleNamespace

        return SimpleNamespace(status="SUCCEEDED" if self.done.returncode == 0 else "FAILED", message="")

    def get_job_logs(self, submission_id):
        return self.done.stdout + self.done.stderr


def test_a_needed_path_the_cluster_cannot_read_is_refused_naming_its_key(tmp_path):
    clone, other = tmp_path / "clone", tmp_path / "other-machine"
    for root in (clone, other):
        (root / "prepared" / "digits").mkdir(parents=True)
    (clone / "prepared" / "digits" / "manifest.json").write_text("{}")
    (other / "prepared" / "digits" / "part-0.parquet").write_text("")
    config = run_config("data/digits.csv", "prepared/digits", "runs", name="r")
    run, changed = jobs.absolute_paths(parse_config(config, "run.yaml"), clone)

    # The cluster sees this machine's files (the same machine, or a shared mount): accepted,
    # and the storage folder made for its marker is gone again.
    same = ProcessJobs()
    jobs.check_cluster_reads(same, changed, "http://head:8265")
    assert len(same.ids) == 1 and same.ids[0].startswith(jobs.PROBE_PREFIX)
    assert sorted(p.name for p in clone.iterdir()) == ["prepared"]

    # Storage shared, the prepared dataset not (the other machine has a folder of that name,
    # holding something else): refused, naming the key, the path and the fix.
    with pytest.raises(UserError) as refused:
        jobs.check_cluster_reads(ProcessJobs({clone / "prepared": other / "prepared"}), changed, "http://head:8265")
    assert str(refused.value) == (
        f"data.output: prepared/digits is {clone}/prepared/digits on this machine, which the cluster at "
        "http://head:8265 cannot read; put it on storage both reach (an s3:// URI, or a shared mount at the same "
        "path) and give that path")
    # Storage the cluster does not share: its marker is not there, even where the folder exists.
    (other / "runs").mkdir()
    with pytest.raises(UserError, match=r"^storage: runs is .*/clone/runs on this machine, which the cluster"):
        jobs.check_cluster_reads(ProcessJobs({clone: other}), changed, "http://head:8265")
    assert sorted(p.name for p in clone.iterdir()) == ["prepared"] and list((other / "runs").iterdir()) == []
    # A relative path that exists neither here nor there still names this machine's folder.
    missing = [p for p in jobs.absolute_paths(parse_config(run_config("d.csv", "nowhere/x", "runs", name="r"), "r"),
                                              clone)[1] if p.key == "data.output"]
    jobs.check_cluster_reads(ProcessJobs(), missing, "http://head:8265")
    with pytest.raises(UserError, match="^data.output: nowhere/x is "):
        (other / "nowhere" / "x").mkdir(parents=True)
        jobs.check_cluster_reads(ProcessJobs({clone: other}), missing, "http://head:8265")
    # The raw source is not read by the job: a config whose only relative path is that probes nothing.
    only_source = [p for p in changed if p.key == "data.source"]
    nothing = ProcessJobs()
    jobs.check_cluster_reads(nothing, only_source, "http://head:8265")
    assert nothing.ids == []


def test_a_job_with_a_relative_storage_refuses_to_write_into_its_temporary_directory(tmp_path):
    import yaml

    config = run_config(tmp_path / "d.csv", tmp_path / "p", "runs", name="r")
    env = {"STOKER_RUN_CONFIG": yaml.safe_dump(config)}
    result = subprocess.run([sys.executable, "-m", "stoker.job_entry"], capture_output=True, text=True,
                            cwd=tmp_path, env={**__import__("os").environ, **env}, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("stoker: error: storage: runs is relative, so the run would be written into the job's")
    assert not (tmp_path / "runs").exists()


def test_a_followed_job_that_failed_is_recorded_with_its_reason_and_no_run_directory(tmp_path):
    """The README's walk before `stoker data prepare`: the job exits 2 before the run exists.
    The registry here says failed and why; no run directory is made for it on this side."""
    from types import SimpleNamespace

    from stoker.cluster.registry import registry_for_run
    from stoker.cluster.run_life import record_job_outcome

    config = run_config(tmp_path / "d.csv", tmp_path / "prepared", tmp_path / "runs", name="r")
    run = parse_config(config, "run.yaml")
    message = ("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
               "Running entrypoint for job stoker-r: python -m stoker.job_entry\n"
               f"stoker: error: data.output: no prepared dataset at {tmp_path}/prepared (manifest.json missing)\n")
    client = SimpleNamespace(get_job_info=lambda _: SimpleNamespace(message=message))
    registry = registry_for_run(run)
    registry.upsert_run("id1", name="r", status="submitted", submission_id="stoker-r")
    record_job_outcome(registry, run, "id1", "FAILED", client, "stoker-r", "http://head:8265")
    [record] = registry.runs(name="r")
    assert (record.status, record.error) == (
        "failed", f"job stoker-r FAILED: data.output: no prepared dataset at {tmp_path}/prepared (manifest.json missing)")
    assert not (tmp_path / "runs" / "r").exists()
    # A run directory that another submission of the name wrote (another id) is not taken as this run's.
    (tmp_path / "runs" / "r").mkdir()
    (tmp_path / "runs" / "r" / "run_id").write_text("other\n")
    registry.upsert_run("id2", name="r", status="submitted", submission_id="stoker-r-retry2")
    record_job_outcome(registry, run, "id2", "STOPPED", client, "stoker-r-retry2", "http://head:8265")
    record = next(r for r in registry.runs(name="r") if r.id == "id2")
    assert (record.status, record.run_dir, record.error) == ("stopped", None, None)


def test_submitting_a_run_another_driver_is_training_is_refused_before_contacting_the_cluster(tmp_path):
    from stoker.trainer.run_dir import locate

    config = run_config(tmp_path / "d.csv", tmp_path / "p", tmp_path / "runs", name="busy")
    write_config(tmp_path, config)
    lease = locate(str(tmp_path / "runs"), "busy").take_lease("busy")  # as a `stoker train` holds it
    try:
        # Port 1: nothing listens there; the refusal must come before any connection.
        result = stoker("submit", "run.yaml", "--address", "http://127.0.0.1:1", cwd=tmp_path)
    finally:
        lease.release()
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"stoker: error: run busy is being trained by pid {lease.holder.pid} ")


def test_a_submission_waits_for_a_head_whose_job_agent_is_still_starting():
    """Ray's JobSubmissionClient raises this until a just-started head's job agent registers
    (the README's `ray start --head` then `stoker submit` hit it); any other error is not retried."""
    from stoker.cluster import jobs

    class StartingHead:
        def __init__(self, refusals: int, error: str) -> None:
            self.refusals, self.error, self.calls = refusals, error, 0

        def get_address(self) -> str:
            return "http://head:8265"

        def submit_job(self, **job):
            self.calls += 1
            if self.calls <= self.refusals:
                raise RuntimeError(self.error)
            return job["submission_id"]

    starting = "Request failed with status code 500: No available agent to submit job, please try again later.."
    head = StartingHead(2, starting)
    assert jobs.submit_job(head, wait_s=30, submission_id="stoker-r") == "stoker-r" and head.calls == 3
    broken = StartingHead(1, "Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="400"):
        jobs.submit_job(broken, wait_s=30, submission_id="stoker-r")
    assert broken.calls == 1
    never = StartingHead(100, starting)
    with pytest.raises(UserError, match="^--address: the Ray cluster at http://head:8265 has no job agent after 0s"):
        jobs.submit_job(never, wait_s=0, submission_id="stoker-r")
