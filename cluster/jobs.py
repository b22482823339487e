"""Submitting runs to a remote Ray cluster's Jobs API and following them.

The address comes from `--address`, else RAY_ADDRESS, else the config's `cluster.address`. When
the cluster uses Ray token authentication, the token is read from RAY_AUTH_TOKEN or the file
named by RAY_AUTH_TOKEN_PATH and sent only as an HTTP header: it is never printed, logged,
written to the config or put in the job's runtime_env.

A run is submitted with the submission id `stoker-<run name>`; submitting the same run again
while it is active attaches to it, and after it failed or was stopped submits a retry
(`stoker-<name>-retry<N>`) that resumes from the run's checkpoints on the shared storage.
"""

import ast
import inspect
import json
import os
import re
import shlex
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pathspec
import requests
import yaml

from stoker.cluster.config import ClusterConfig
from stoker.errors import UserError
from stoker.trainer.run_spec import Run, RunSpec
from stoker.tune.schema import SearchRun

ENV_ADDRESS = "RAY_ADDRESS"
ENV_TOKEN = "RAY_AUTH_TOKEN"
ENV_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
ENV_CONFIG = "STOKER_RUN_CONFIG"
ENV_RUN_ID = "STOKER_RUN_ID"
ACTIVE = ("PENDING", "RUNNING")
# What a job of a run config runs: a search when the config has a tune section.
VERBS = ("train", "tune")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def cluster_of(run: RunSpec) -> ClusterConfig:
    """The run's cluster section: the CLI's `RunConfig` has one; a run without one (a plain
    `RunSpec`) gets the defaults, as a config without the section does."""
    cluster = getattr(run, "cluster", None)
    return cluster if isinstance(cluster, ClusterConfig) else ClusterConfig()


def job_verb(config: Mapping[str, Any]) -> str:
    """The `stoker` verb a job runs for a run config (as a dict): `tune` when it has a `tune:`
    section, else `train`. The one rule for every way a run leaves this machine (`stoker
    submit`'s entrypoint and `stoker k8s render`'s RayJob), so the same config never searches
    on one and trains on the other."""
    return "tune" if config.get("tune") else "train"


def resolve_address(cli_address: str | None, config_address: str | None = None) -> str | None:
    """The Jobs API URL to use, or None for the embedded local cluster."""
    address = cli_address or os.environ.get(ENV_ADDRESS) or config_address
    if not address:
        return None
    address = address.rstrip("/")
    if address.startswith("ray://") or address in ("auto", "local"):
        raise UserError(
            f"--address: {address} is not a Jobs API address; give the head's dashboard URL, "
            "e.g. http://head:8265"
        )
    if not re.match(r"^https?://", address):
        address = "http://" + address
    return address


def auth_headers() -> dict[str, str]:
    """The Authorization header for a token-auth cluster, from the environment only."""
    token = os.environ.get(ENV_TOKEN)
    if not token and os.environ.get(ENV_TOKEN_PATH):
        path = Path(os.environ[ENV_TOKEN_PATH]).expanduser()
        try:
            token = path.read_text()
        except OSError as exc:
            raise UserError(f"{ENV_TOKEN_PATH}: cannot read the token file {path}: {exc.strerror}") from None
        if not token.strip():
            raise UserError(f"{ENV_TOKEN_PATH}: the token file {path} is empty")
    if not token:
        return {}
    return {"Authorization": f"Bearer {token.strip()}"}


def connect(address: str, timeout_s: float = 10.0):
    """A `JobSubmissionClient` for `address`, after checking that the Jobs API answers and
    accepts our token; every failure is a one-line `UserError` naming the address."""
    headers = auth_headers()
    started = time.monotonic()
    try:
        response = requests.get(f"{address}/api/version", headers=headers, timeout=timeout_s)
    except requests.exceptions.RequestException as exc:
        waited = time.monotonic() - started
        kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
        raise UserError(
            f"--address: cannot reach the Ray Jobs API at {address} ({kind} after {waited:.1f}s of "
            f"a {timeout_s:g}s limit); is the cluster up and the dashboard port open?"
        ) from None
    if response.status_code == 401:
        raise UserError(
            f"--address: the Ray cluster at {address} requires a token; set {ENV_TOKEN} or {ENV_TOKEN_PATH}"
        )
    if response.status_code == 403:
        raise UserError(
            f"--address: the Ray cluster at {address} rejected the token from "
            f"{ENV_TOKEN if os.environ.get(ENV_TOKEN) else ENV_TOKEN_PATH}"
        )
    if response.status_code != 200:
        raise UserError(f"--address: {address}/api/version answered HTTP {response.status_code}; is it a Ray dashboard?")

    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=headers)


AGENT_WAIT_S = 60.0
"""How long a submission waits for the head's job agent (see `submit_job`)."""


def submit_job(client, wait_s: float = AGENT_WAIT_S, **job) -> str:
    """`client.submit_job(**job)`, waiting up to `wait_s` for the head's job agent: a head
    started moments ago (`ray start --head`, then the README's submit) answers HTTP 500 "No
    available agent to submit job, please try again later" until its dashboard agent has
    registered, which took over 25 s on a loaded 2-CPU machine."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise UserError(f"--address: the Ray cluster at {client.get_address()} has no job agent after "
                                f"{wait_s:g}s of waiting; its dashboard agent did not start (see the head's "
                                "dashboard_agent.log: a port in use?)") from None
            time.sleep(1.0)


# -- paths ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalPath:
    """A relative path of a submitted config, made absolute on the submitting machine."""

    key: str
    """The config key, e.g. `data.output` or `tune.warm_start[0]`."""
    written: str
    """The value as the config has it (`prepared/digits`)."""
    path: str
    """The absolute path it names here."""
    needed: bool
    """The job reads or writes it, so the cluster must see it."""


def _is_uri(value: str) -> bool:
    return "://" in value


def _sqlite_file(url: str) -> str | None:
    """The database file of a `sqlite:///relative.db` URL; None for any other URL (an absolute
    file is `sqlite:////abs.db`, memory `sqlite://`)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url.startswith(prefix + "/") or len(url) == len(prefix):
        return None
    return url[len(prefix):].split("?", 1)[0]


def absolute_paths(run: Run, cwd: Path) -> tuple[Run, list[LocalPath]]:
    """`run` with every relative path made absolute against `cwd`, the directory `stoker
    submit` runs in (where `stoker train` of the same config resolves them), and the paths it
    changed. Absolute paths and URIs (`s3://`) are left as written: they already name one place
    for both sides. Without this the job would resolve them inside its uploaded working
    directory, a temporary copy without the gitignored data and gone when it ends. The run keeps
    its type; the sections beyond the run's own (`tune`, `cluster`) are resolved when it has them."""
    changed: list[LocalPath] = []

    def resolve(value: str, key: str, needed: bool) -> str:
        if _is_uri(value) or os.path.isabs(value):
            return value
        # As `stoker train` reads it (tune.runner.absolute_paths too): no `~` expansion.
        path = os.path.normpath(os.path.join(cwd, value))
        changed.append(LocalPath(key, value, path, needed))
        return path

    def resolve_sqlite(url: str | None, key: str) -> str | None:
        relative = _sqlite_file(url) if url else None
        if relative is None or os.path.isabs(relative):
            return url
        path = os.path.normpath(os.path.join(cwd, relative))
        # The job opens the database: its folder must be shared.
        changed.append(LocalPath(key, url, os.path.dirname(path), True))
        return "sqlite:///" + path + url[len("sqlite:///") + len(relative):]

    # The job writes the run (checkpoints, records, the default registry) under storage.
    updates: dict[str, Any] = {"storage": resolve(run.storage, "storage", True)}
    data = run.data
    # The job trains on the prepared dataset; the raw source is only recorded with the run.
    if isinstance(data.source, str):
        source: str | list[str] = resolve(data.source, "data.source", False)
    else:
        source = [resolve(s, f"data.source[{i}]", False) for i, s in enumerate(data.source)]
    updates["data"] = data.model_copy(update={"source": source, "output": resolve(data.output, "data.output", True)})
    if isinstance(run, SearchRun) and run.tune is not None:
        warm_start = [resolve(p, f"tune.warm_start[{i}]", True) for i, p in enumerate(run.tune.warm_start)]
        updates["tune"] = run.tune.model_copy(update={"warm_start": warm_start})
    tracking = run.train.tracking
    mlflow_uri = resolve_sqlite(tracking.mlflow_uri, "train.tracking.mlflow_uri")
    updates["train"] = run.train.model_copy(update={"tracking": tracking.model_copy(update={"mlflow_uri": mlflow_uri})})
    cluster = getattr(run, "cluster", None)
    if cluster is not None:
        url = resolve_sqlite(cluster.registry.url, "cluster.registry.url")
        updates["cluster"] = cluster.model_copy(update={"registry": cluster.registry.model_copy(update={"url": url})})
    # Typed copies, not a dict validated again: the values are the same kinds of path.
    return run.model_copy(update=updates), changed


def _path_signature(path, marker=None):
    """What a path looks like from where this runs, compared between the submitting machine and
    the cluster. Standard library only: the probe job runs this function's source with the
    cluster's `python`. With `marker`: the content of that file in `path` (written just before
    by the submitting side, so a shared folder that runs write to meanwhile still matches).
    Else a file's size and mtime, a folder's entry names, or for a path that does not exist,
    its nearest existing ancestor (by name only: /tmp changes by the second)."""
    import hashlib
    import os

    if marker:
        try:
            with open(os.path.join(path, marker)) as handle:
                return "marker:" + handle.read()
        except OSError:
            return None
    try:
        if os.path.isdir(path):
            names = "\n".join(sorted(os.listdir(path)))
            return f"dir:{path}:" + hashlib.sha256(names.encode()).hexdigest()
        if os.path.exists(path):
            stat = os.stat(path)
            return f"file:{path}:{stat.st_size}:{int(stat.st_mtime)}"
    except OSError:
        return None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return f"missing-below:{path}"


PROBE_ENV = "STOKER_PROBE_PATHS"
PROBE_TAG = "STOKER_PROBE "


def _source_without_docstring(function) -> str:
    tree = ast.parse(inspect.getsource(function))
    tree.body[0].body = tree.body[0].body[1:]  # its docstring: the job's entrypoint stays short
    return ast.unparse(tree) + "\n"


PROBE_SCRIPT = _source_without_docstring(_path_signature) + (
    "import json, os\n"
    f"print({PROBE_TAG!r} + json.dumps([_path_signature(p, m) for p, m in json.loads(os.environ[{PROBE_ENV!r}])]))\n"
)


PROBE_PREFIX = "stoker-path-probe-"
# A finished probe is deleted by the next one, once Ray's job monitor is surely done with it:
# deleted at once, the monitor (which watches the probe's supervisor actor exit) writes the job
# back as FAILED, "Job supervisor actor died".
PROBE_KEEP_S = 60


def probe_paths(client, checks: list[tuple[str, str | None]], timeout_s: float = 120) -> list[str | None]:
    """`_path_signature` of each (path, marker) as the cluster sees it: a tiny Ray job on the
    head (the standard library only, nothing uploaded); `stoker jobs list` leaves probes out."""
    now_ms = time.time() * 1000
    for job in client.list_jobs():
        if (job.submission_id or "").startswith(PROBE_PREFIX) and status_name(job) in TERMINAL \
                and job.end_time and now_ms - job.end_time > PROBE_KEEP_S * 1000:
            try:
                client.delete_job(job.submission_id)
            except Exception:  # noqa: BLE001 - a probe left listed is harmless
                pass
    submission_id = f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    submit_job(client, entrypoint=f"python -c {shlex.quote(PROBE_SCRIPT)}", submission_id=submission_id,
               runtime_env={"env_vars": {PROBE_ENV: json.dumps(checks)}})
    status = wait(client, submission_id, timeout_s, poll_s=0.2)
    if status not in TERMINAL:
        client.stop_job(submission_id)
        raise UserError(f"--address: the job that checks which paths the cluster can read did not finish in "
                        f"{timeout_s:g}s ({submission_id}, {status}); is the cluster's head overloaded?")
    logs = client.get_job_logs(submission_id)
    line = next((x for x in logs.splitlines() if x.startswith(PROBE_TAG)), None)
    if status != "SUCCEEDED" or line is None:
        last = (logs.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--address: the job that checks which paths the cluster can read ended {status}: {last}")
    return json.loads(line[len(PROBE_TAG):])


def check_cluster_reads(client, paths: list[LocalPath], address: str) -> None:
    """Refuse, before anything is uploaded, a relative path that the job needs and that the
    cluster does not see as this machine does: the same folder at the same absolute path (this
    machine, or a mount both share). A storage folder is created here and tested with a marker
    file, so a folder that runs write to meanwhile still matches."""
    needed = [p for p in paths if p.needed]
    if not needed:
        return
    marker = f".stoker-probe-{uuid.uuid4().hex[:12]}"
    marked: list[Path] = []
    created: list[Path] = []
    checks: list[tuple[str, str | None]] = []
    try:
        for local in needed:
            checks.append((local.path, None))
            if local.key != "storage":
                continue
            folder = Path(local.path)
            try:
                if not folder.exists():
                    top = folder
                    while not top.parent.exists():
                        top = top.parent
                    folder.mkdir(parents=True)
                    created.append(top)
                (folder / marker).write_text(marker)
            except OSError:
                continue  # not writable here: compared as any folder
            marked.append(folder / marker)
            checks[-1] = (local.path, marker)
        here = [_path_signature(path, mark) for path, mark in checks]
        there = probe_paths(client, checks)
    finally:
        for path in marked:
            path.unlink(missing_ok=True)
        for top in created:
            # The job makes it again; a refused submit leaves nothing behind.
            if not any(p.is_file() for p in top.rglob("*")):
                shutil.rmtree(top, ignore_errors=True)
    for local, mine, theirs in zip(needed, here, there, strict=True):
        if mine is None or mine != theirs:
            raise UserError(
                f"{local.key}: {local.written} is {local.path} on this machine, which the cluster at {address} "
                "cannot read; put it on storage both reach (an s3:// URI, or a shared mount at the same path) "
                "and give that path"
            )


# -- packaging ------------------------------------------------------------------------------------


IGNORE_FILES = (".gitignore", ".rayignore")


def upload_size(directory: Path, excludes: list[str]) -> tuple[int, int]:
    """(bytes, files) Ray will upload for `directory`: what is left after `excludes`
    (gitignore-style, relative to `directory`) and the patterns of every .gitignore and
    .rayignore on the way (each relative to its own folder), the rules Ray's packaging applies.
    Walked here, not with Ray's private traversal, so a Ray upgrade cannot break the check."""
    root = directory.absolute()
    rules = [(root, pathspec.PathSpec.from_lines("gitwildmatch", excludes))]
    totals = [0, 0]
    _walk(root, rules, totals)
    return totals[0], totals[1]


def _walk(folder: Path, rules: list[tuple[Path, pathspec.PathSpec]], totals: list[int]) -> None:
    rules = rules + [
        (folder, pathspec.PathSpec.from_lines("gitwildmatch", (folder / name).read_text().splitlines()))
        for name in IGNORE_FILES if (folder / name).is_file()
    ]
    for entry in sorted(folder.iterdir()):
        is_dir = entry.is_dir()
        if any(_ignored(spec, entry.relative_to(base).as_posix(), is_dir) for base, spec in rules):
            continue  # an excluded folder is not entered, as in Ray's traversal
        if is_dir:
            _walk(entry, rules, totals)
        elif entry.is_file():
            totals[0] += entry.stat().st_size
            totals[1] += 1


def _ignored(spec: pathspec.PathSpec, relative: str, is_dir: bool) -> bool:
    # A pattern ending in "/" names folders only; git matches it against "name/".
    return spec.match_file(relative) or (is_dir and spec.match_file(relative + "/"))


def submission_id_for(name: str, attempt: int = 1) -> str:
    base = f"stoker-{name}"
    return base if attempt == 1 else f"{base}-retry{attempt}"


def attempts_of(client, name: str) -> list[Any]:
    """The Ray jobs this run was submitted as, oldest first."""
    base = submission_id_for(name)
    pattern = re.compile(rf"^{re.escape(base)}(-retry(\d+))?$")
    jobs = [job for job in client.list_jobs() if job.submission_id and pattern.match(job.submission_id)]
    return sorted(jobs, key=lambda job: int(pattern.match(job.submission_id).group(2) or 1))


@dataclass
class Submission:
    submission_id: str
    action: str  # "submitted", "resumed" (a retry), "attached" (already running), "done"
    status: str


def runtime_env_for(run: RunSpec, working_dir: Path, run_id: str, submission_id: str, git_commit: str | None) -> dict:
    """The job's runtime_env: the working directory, the resolved config (every section `run`
    has: the CLI's sections too), non-secret env vars and pinned pip requirements. Nothing from RAY_AUTH_* is ever added."""
    from stoker.ray_internals import job_stop_wait
    from stoker.trainer.stop_flag import STOP_WAIT_S

    submit = cluster_of(run).submit
    env_vars = {
        # A stopping driver waits up to STOP_WAIT_S for the workers' checkpoint
        # (stoker.trainer.stop_flag), and the job's supervisor then 5 s more; a user's setting wins.
        **job_stop_wait(int(STOP_WAIT_S) + 5),
        **submit.env_vars,
        ENV_CONFIG: yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False),
        ENV_RUN_ID: run_id,
        "STOKER_SUBMISSION_ID": submission_id,
        "RAY_TRAIN_V2_ENABLED": "1",
    }
    if git_commit:
        env_vars["STOKER_GIT_COMMIT"] = git_commit
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(submit.excludes),
        "env_vars": env_vars,
    }
    if submit.pip:
        runtime_env["pip"] = list(submit.pip)
    return runtime_env


def submit_run(client, run: RunSpec, working_dir: Path, run_id: str, git_commit: str | None,
               job_name: str | None = None, paths: list[LocalPath] = (), address: str = "the cluster") -> Submission:
    """Submit `run` (its paths made absolute by `absolute_paths`; its `cluster.submit` section,
    `cluster_of`, says how) or
    attach to / resume its earlier submission.

    `job_name` names the submission (`stoker-<job_name>`); default the run's name. A search
    passes its experiment's name, so it never attaches to a training of the same run name.
    `paths`: the relative paths `absolute_paths` changed, checked with the cluster
    (`check_cluster_reads`) before a new job is submitted."""
    submit = cluster_of(run).submit
    job_name = job_name or run.name
    if not working_dir.is_dir():
        raise UserError(f"cluster.submit.working_dir: {working_dir} is not a directory")
    size, files = upload_size(working_dir, submit.excludes)
    limit = int(submit.max_upload_mb * 1024 * 1024)
    if size > limit:
        raise UserError(
            f"cluster.submit.working_dir: {working_dir} is {size / 2**20:.1f} MiB in {files} files after "
            f"excludes, over cluster.submit.max_upload_mb ({submit.max_upload_mb:g}); exclude data and "
            "outputs (cluster.submit.excludes) and read them from shared storage"
        )
    previous = attempts_of(client, job_name)
    if previous:
        latest = previous[-1]
        status = str(latest.status.value if hasattr(latest.status, "value") else latest.status)
        if status in ACTIVE:
            return Submission(latest.submission_id, "attached", status)
        if status == "SUCCEEDED":
            return Submission(latest.submission_id, "done", status)
    check_cluster_reads(client, list(paths), address)
    attempt = len(previous) + 1
    submission_id = submission_id_for(job_name, attempt)
    submit_job(
        client,
        entrypoint="python -m stoker.job_entry",
        submission_id=submission_id,
        runtime_env=runtime_env_for(run, working_dir, run_id, submission_id, git_commit),
        entrypoint_num_cpus=submit.entrypoint_num_cpus or None,
        metadata={"stoker_run": run.name, "stoker_run_id": run_id,
                  "stoker_verb": job_verb(run.model_dump(mode="json"))},
    )
    return Submission(submission_id, "resumed" if previous else "submitted", "PENDING")


def find_job(client, ref: str, address: str):
    """A job by submission id, Ray job id, or stoker run name (its latest attempt)."""
    for job in client.list_jobs():
        if ref in (job.submission_id, job.job_id):
            return job
    attempts = attempts_of(client, ref)
    if attempts:
        return attempts[-1]
    raise UserError(f"job {ref!r} does not exist on {address} (see `stoker jobs list`)")


def status_name(job) -> str:
    return str(job.status.value if hasattr(job.status, "value") else job.status)


def job_message(client, submission_id: str) -> str:
    """One line on why a job ended: the last `stoker: error:` line of the logs the Jobs API's
    message carries (a refused config, named by key), else the message's first line ("Job
    entrypoint command failed with exit code 1, ..."); "" when the API cannot say."""
    try:
        lines = (client.get_job_info(submission_id).message or "").splitlines()
    except Exception:  # noqa: BLE001 - only adds detail to a status already known
        return ""
    said = [line.removeprefix("stoker: error: ") for line in lines if line.startswith("stoker: error: ")]
    return said[-1] if said else (lines[0] if lines else "")


def wait(client, submission_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal state; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = status_name(client.get_job_info(submission_id))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
