"""Submitting runs to a remote Ray cluster's Jobs API and following them.

The address comes from `--address`, else RAY_ADDRESS, else the config's `cluster.address`. When
the cluster uses Ray token authentication, the token is read from RAY_AUTH_TOKEN or the file
named by RAY_AUTH_TOKEN_PATH and sent only as an HTTP header: it is never printed, logged,
written to the config or put in the job's runtime_env.

A run is submitted with the submission id `stoker-<run name>`; submitting the same run again
while it is active attaches to it, and after it failed or was stopped submits a retry
(`stoker-<name>-retry<N>`) that resumes from the run's checkpoints on the shared storage.
"""

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pathspec
import requests
import yaml

from stoker.errors import UserError

ENV_ADDRESS = "RAY_ADDRESS"
ENV_TOKEN = "RAY_AUTH_TOKEN"
ENV_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
ENV_CONFIG = "STOKER_RUN_CONFIG"
ENV_RUN_ID = "STOKER_RUN_ID"
ACTIVE = ("PENDING", "RUNNING")
# What a job of a run config runs: a search when the config has a tune section.
VERBS = ("train", "tune")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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


def runtime_env_for(run, working_dir: Path, run_id: str, submission_id: str, git_commit: str | None) -> dict:
    """The job's runtime_env: the working directory, the resolved config, non-secret env vars
    and pinned pip requirements. Nothing from RAY_AUTH_* is ever added."""
    submit = run.cluster.submit
    env_vars = {
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


def submit_run(client, run, working_dir: Path, run_id: str, git_commit: str | None,
               job_name: str | None = None) -> Submission:
    """Submit `run` (a validated RunConfig) or attach to / resume its earlier submission.

    `job_name` names the submission (`stoker-<job_name>`); default the run's name. A search
    passes its experiment's name, so it never attaches to a training of the same run name."""
    submit = run.cluster.submit
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
    attempt = len(previous) + 1
    submission_id = submission_id_for(job_name, attempt)
    client.submit_job(
        entrypoint="python -m stoker.cluster.entry",
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


def wait(client, submission_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal state; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = status_name(client.get_job_info(submission_id))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
