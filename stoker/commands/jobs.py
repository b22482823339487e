"""`stoker jobs list|status|logs|stop`: Ray Jobs on a remote cluster."""

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

from stoker.commands.submit import add_address_option, follow_logs
from stoker.commands.tables import print_records, progress_cell
from stoker.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("jobs", help="list, follow and stop jobs on a Ray cluster")
    verbs = parser.add_subparsers(dest="jobs_command", metavar="VERB")
    verbs.required = True
    listing = verbs.add_parser("list", help="jobs on the cluster, newest first")
    listing.add_argument("--all", action="store_true", help="include jobs not submitted by stoker")
    listing.add_argument("--json", action="store_true")
    status = verbs.add_parser("status", help="a job's status")
    logs = verbs.add_parser("logs", help="a job's logs")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    stop = verbs.add_parser("stop", help="stop a job (its checkpoints stay; submitting again resumes)")
    stop.add_argument("--wait", action="store_true", help="wait until it has stopped")
    for verb, handler in ((listing, _list), (status, _status), (logs, _logs), (stop, _stop)):
        if verb is not listing:
            verb.add_argument("job", help="submission id, Ray job id or run name")
        add_address_option(verb)
        verb.add_argument("--timeout", type=float, default=10, help="seconds to wait for the Jobs API")
        verb.set_defaults(handler=handler)


def _client(args: argparse.Namespace):
    from stoker.cluster import jobs

    address = jobs.resolve_address(args.address)
    if address is None:
        raise UserError("--address: no cluster given; pass --address URL or set RAY_ADDRESS")
    return jobs.connect(address, args.timeout), address


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _list(args: argparse.Namespace) -> int:
    from stoker.cluster.jobs import PROBE_PREFIX, status_name

    client, _ = _client(args)
    # Without --all: the runs stoker submitted, not the jobs that checked their paths.
    found = [j for j in client.list_jobs() if args.all or (
        (j.submission_id or "").startswith("stoker-") and not j.submission_id.startswith(PROBE_PREFIX))]
    found.sort(key=lambda j: j.start_time or 0, reverse=True)
    records = [{"submission_id": j.submission_id, "job_id": j.job_id, "status": status_name(j),
                "start_time": j.start_time, "end_time": j.end_time, "message": j.message} for j in found]
    print_records(records, [
        ("SUBMISSION", lambda r: r["submission_id"] or r["job_id"]),
        ("STATUS", lambda r: r["status"]),
        ("STARTED", lambda r: _when(r["start_time"])),
        ("MESSAGE", lambda r: (r["message"] or "")[:60]),
    ], args.json)
    return 0


def _status(args: argparse.Namespace) -> int:
    from stoker.cluster.jobs import find_job, status_name

    client, address = _client(args)
    job = find_job(client, args.job, address)
    print(f"{job.submission_id}: {status_name(job)}" + (f" ({job.message})" if job.message else ""))
    run = _run_of(job)
    if run is not None:
        _print_progress(run, status_name(job) == "RUNNING")
    return 0


def _run_of(job):
    """The job's validated run config, where this machine can read what the run writes (its
    storage is a local or shared folder; an S3 run's registry row has its scaling and scores
    once it ends); else None."""
    import yaml

    from stoker.cluster.jobs import ENV_CONFIG
    from stoker.config import parse_config
    from stoker.trainer.run_dir import is_s3

    sent = ((job.runtime_env or {}).get("env_vars") or {}).get(ENV_CONFIG)
    try:
        run = parse_config(yaml.safe_load(sent), f"job {job.submission_id}") if sent else None
    except UserError:
        return None  # sent by another stoker version: its status line is all there is
    return None if run is None or is_s3(run.storage) else run


def _print_progress(run, running: bool) -> None:
    """A training's workers (and, while it runs, its epoch, samples/s and ETA); a search's
    trials done, stopped, errored and running, and its best so far."""
    from stoker.trainer.run_dir import Records
    from stoker.tune.progress import progress_line, read_progress
    from stoker.tune.storage import experiment_storage

    if run.tune is not None:
        progress = read_progress(experiment_storage(run).local)
        if progress is not None:
            print(f"trials: {progress_line(progress)}")
        return
    records = Records(Path(run.storage) / run.name)
    workers = _workers_line(records)
    if workers:
        print(workers)
    progress = progress_cell(records.progress()) if running else None
    if progress:
        print(f"progress: {progress}")


def _workers_line(records) -> str | None:
    """`workers: 1 (resized 2->1 at epoch 7)`: the training's world size now and its resizes."""
    scaling = records.scaling()
    if scaling is None:
        return None
    resizes = ", ".join(f"{r['workers_from']}->{r['workers_to']} at epoch {r['epoch']}" for r in scaling["resizes"])
    drains = ", ".join(f"epoch {p['epoch']} step {p['micro_step']}" for p in scaling.get("preemptions", []))
    return (f"workers: {scaling['workers']}" + (f" (resized {resizes})" if resizes else "")
            + (f"; preempted at {drains}" if drains else ""))


def _logs(args: argparse.Namespace) -> int:
    from stoker.cluster.jobs import find_job

    client, address = _client(args)
    job = find_job(client, args.job, address)
    if args.follow:
        asyncio.run(follow_logs(client, job.submission_id))
    else:
        sys.stdout.write(client.get_job_logs(job.submission_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from stoker.cluster.jobs import TERMINAL, find_job, status_name, wait

    client, address = _client(args)
    job = find_job(client, args.job, address)
    if status_name(job) in TERMINAL:
        print(f"{job.submission_id} already ended: {status_name(job)}")
        return 0
    client.stop_job(job.submission_id)
    status = wait(client, job.submission_id, timeout_s=120) if args.wait else "stopping"
    print(f"{job.submission_id}: {status}")
    return 0
