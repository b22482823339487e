"""`stoker submit CONFIG --address URL`: run the config as a Ray Job on a remote cluster."""

import argparse
import asyncio
import sys
from pathlib import Path

from stoker.config import RunConfig, load_config
from stoker.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("submit", help="submit a run to a Ray cluster's Jobs API")
    parser.add_argument("config")
    add_address_option(parser)
    parser.add_argument("--name", help="override the config's run name")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 1 if it fails")
    parser.set_defaults(handler=_submit)


def add_address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", metavar="URL",
        help="the cluster's Jobs API, e.g. http://head:8265 (default: RAY_ADDRESS, then cluster.address); "
             "a token-auth cluster's token comes from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH",
    )


def _submit(args: argparse.Namespace) -> int:
    from stoker.cluster import jobs

    run = load_config(args.config)
    if args.name:
        run = run.model_copy(update={"name": args.name})
    # Relative paths mean this machine's folders, as for `stoker train`, never the job's
    # temporary copy of the working directory.
    run, paths = jobs.absolute_paths(run, Path.cwd())
    address = jobs.resolve_address(args.address, run.cluster.address)
    if address is None:
        raise UserError("--address: no cluster given; pass --address URL or set RAY_ADDRESS (or use `stoker train` to run locally)")
    if jobs.job_verb(run.model_dump(mode="json")) == "tune":
        return _submit_search(args, run, address, paths)
    return _submit_training(args, run, address, paths)


def _submit_training(args: argparse.Namespace, run: RunConfig, address: str, paths) -> int:
    from stoker.cluster import jobs
    from stoker.cluster.registry import config_hash, git_state, new_run_id, registry_for_run
    from stoker.cluster.run_life import record_job_outcome

    manifest = local_manifest(run.data.output, run.data.s3)
    fingerprint = manifest.source_fingerprint if manifest else None
    registry = registry_for_run(run)  # a registry that cannot be opened fails before submitting
    _refuse_a_live_run(run)
    client = jobs.connect(address, run.cluster.submit.connect_timeout_s)
    working_dir = Path(run.cluster.submit.working_dir).resolve()
    git = git_state(working_dir)
    commit = f"{git.commit}-dirty" if git.commit and git.dirty else git.commit
    earlier = [r for r in registry.runs(name=run.name) if (r.submission_id or "").startswith(jobs.submission_id_for(run.name))]
    run_id = earlier[0].id if earlier else new_run_id()
    submission = jobs.submit_run(client, run, working_dir, run_id, commit, paths=paths, address=address)
    config = run.model_dump(mode="json")
    registry.upsert_run(
        run_id, name=run.name, status={"SUCCEEDED": "succeeded"}.get(submission.status, "submitted"),
        config=config, config_hash=config_hash(config), data_fingerprint=fingerprint, data_path=run.data.output,
        git_commit=git.commit, git_dirty=git.dirty, submission_id=submission.submission_id, address=address,
    )
    print(f"run {run.name} (id {run_id}) {_VERBS[submission.action]} job {submission.submission_id} on {address}")
    status = _follow(args, client, submission, address)
    if status is None:
        return 0
    record_job_outcome(registry, run, run_id, status, client, submission.submission_id, address)
    return 0 if status == "SUCCEEDED" else 1


def _refuse_a_live_run(run: RunConfig) -> None:
    """A run another driver is training (a `stoker train` on the shared storage, another
    job) is refused here, before a job starts only to be refused on the cluster. Its own
    job, still running, is attached to instead (stoker.cluster.jobs.submit_run)."""
    from stoker.cluster import jobs
    from stoker.trainer.run_dir import locate
    from stoker.trainer.run_lease import busy, live_holder

    live = live_holder(locate(run.storage, run.name, run.data.s3), run.name)
    if live is None:
        return
    own = jobs.submission_id_for(run.name)
    holder_job = live[0].submission_id or ""
    if holder_job != own and not holder_job.startswith(f"{own}-retry"):
        raise busy(run.name, *live)


def _submit_search(args: argparse.Namespace, run: RunConfig, address: str, paths) -> int:
    """A config with a `tune:` section runs its search on the cluster (`stoker tune` there),
    as `stoker k8s render` of the same config does. Everything about the search that can be
    checked here is checked before anything is uploaded."""
    from stoker.cluster import jobs
    from stoker.cluster.registry import git_state, new_run_id
    from stoker.tune.storage import experiment_name

    check_search(run)
    client = jobs.connect(address, run.cluster.submit.connect_timeout_s)
    working_dir = Path(run.cluster.submit.working_dir).resolve()
    git = git_state(working_dir)
    commit = f"{git.commit}-dirty" if git.commit and git.dirty else git.commit
    experiment = experiment_name(run)
    # Each trial is a training of its own inside the search; the search itself is not a run in
    # the registry (its results are the experiment directory's results.csv and best.yaml).
    submission = jobs.submit_run(client, run, working_dir, new_run_id(), commit, job_name=experiment,
                                 paths=paths, address=address)
    print(f"search {experiment} of run {run.name} {_VERBS[submission.action]} job {submission.submission_id} on {address}")
    status = _follow(args, client, submission, address)
    return 0 if status in (None, "SUCCEEDED") else 1


def check_search(run: RunConfig) -> None:
    """The checks `stoker tune` makes before any trial starts that need no cluster: every path
    and value of the space, the points to evaluate, and the metric. The task comes from the
    prepared dataset when it is readable here, else from the config."""
    from stoker.tune.space import check_space, resolve_metric

    base = run.model_dump(mode="json")
    base["tune"] = None
    check_space(base, run.tune, RunConfig)
    manifest = local_manifest(run.data.output, run.data.s3)
    task = manifest.task if manifest else run.data.task
    resolve_metric(run.tune, task, run.train.metric)


_VERBS = {
    "submitted": "submitted", "resumed": "resubmitted (resuming from its checkpoints)",
    "attached": "is already running as", "done": "already succeeded as",
}


def _follow(args: argparse.Namespace, client, submission, address: str) -> str | None:
    """With --follow, stream the job's logs and return its final status; else None."""
    from stoker.cluster import jobs

    if not args.follow:
        print(f"follow it with: stoker jobs logs {submission.submission_id} --follow --address {address}")
        return None
    asyncio.run(follow_logs(client, submission.submission_id))
    status = jobs.wait(client, submission.submission_id, timeout_s=60)
    print(f"job {submission.submission_id}: {status}")
    return status


async def follow_logs(client, submission_id: str) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def local_manifest(prepared: str, s3):
    """The prepared dataset's manifest when it is readable from here, else None. A path may name the
    cluster's storage only; an s3:// URI reads the same everywhere, so one that cannot be
    read (no such bucket, credentials refused) is refused before anything is uploaded."""
    from stoker.datasets.manifest import Manifest
    from stoker.datasets.storage import is_s3

    try:
        return Manifest.read(prepared, s3)
    except UserError:
        if is_s3(prepared):
            raise
        return None  # prepared on the cluster's storage only; the job records it
