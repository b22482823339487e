"""`stoker k8s render|apply|status|delete`: a run config -> a KubeRay RayJob, and its lifecycle.

The config is validated like any run first, so a broken config fails here and not an hour later
in a pod. `--storage` moves the run directory onto the cluster's shared volume: a retried job
must find its checkpoints, so `storage` has to be shared (`/mnt/shared/...` or `s3://...`).
`--queue` hands the RayJob to a Kueue LocalQueue; `--keep-failed-cluster` and
`--keep-finished-job` set its deletion rules (docs/kubernetes.md). A run name that cannot
name a RayJob as it is (over 47 characters, not DNS-1035) is shortened with a stable hash and
said on stderr.
"""

import argparse
import sys
from pathlib import Path

import yaml

from stoker.config import load_config
from stoker.errors import UserError

DEFAULT_NAMESPACE = "stoker"
# For --help only (render is imported lazily); a test keeps them equal to render's.
DEFAULT_KEEP_FAILED_CLUSTER_S = 3600
DEFAULT_KEEP_FINISHED_JOB_S = 86400


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("k8s", help="run on Kubernetes with KubeRay")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    for verb, handler, text in (
        ("render", _render, "print the ConfigMap + RayJob for a run config as YAML"),
        ("apply", _apply, "server-side apply the rendered objects to the current kube context"),
    ):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("config")
        p.add_argument("--overlay", required=True, help="k8s/overlays/<name> the cluster was deployed with")
        p.add_argument("--storage", help="run storage on the cluster, e.g. /mnt/shared/runs")
        p.add_argument("--image", help="stoker image (default: the pinned release image)")
        p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
        p.add_argument("--queue", metavar="NAME",
                       help="Kueue LocalQueue: label the RayJob for it and create it suspended "
                            "until Kueue admits it (its cluster is deleted as soon as it ends)")
        p.add_argument("--keep-failed-cluster", metavar="SECONDS",
                       help=f"keep a failed job's Ray cluster this long for debugging "
                            f"(default {DEFAULT_KEEP_FAILED_CLUSTER_S}; not with --queue)")
        p.add_argument("--keep-finished-job", metavar="SECONDS",
                       help=f"delete the finished RayJob object this long after it ends "
                            f"(default {DEFAULT_KEEP_FINISHED_JOB_S}; a failed one never before "
                            f"its cluster; not with --queue)")
        if verb == "apply":
            p.add_argument("--dry-run", action="store_true", help="validate on the server, store nothing")
        p.set_defaults(handler=handler)
    status = verbs.add_parser("status", help="one honest state of a RayJob, its pods and its Ray job")
    status.add_argument("name", help="run name or RayJob name")
    status.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    status.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="poll until the job ends or this deadline passes (default: one look)")
    status.set_defaults(handler=_status)
    delete = verbs.add_parser("delete", help="delete a run's RayJob and config")
    delete.add_argument("name", help="run name or RayJob name")
    delete.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    delete.set_defaults(handler=_delete)


def rendered_objects(args: argparse.Namespace) -> list[dict]:
    from stoker.cluster.k8s.render import K8sConfigError, rayjob_name_note, render_rayjob

    keep_failed = _seconds("--keep-failed-cluster", args.keep_failed_cluster)
    keep_finished = _seconds("--keep-finished-job", args.keep_finished_job)
    run = load_config(args.config)
    raw = yaml.safe_load(Path(args.config).read_text())
    if args.storage:
        raw["storage"] = args.storage
        run = run.model_copy(update={"storage": args.storage})
    # The ConfigMap carries the (possibly re-pointed) YAML that `stoker train` reads in the pod.
    text = yaml.safe_dump(raw, sort_keys=False)
    try:
        objects = render_rayjob(
            run,
            text,
            args.overlay,
            run.name,
            image=args.image,
            queue=args.queue,
            keep_failed_cluster_s=keep_failed,
            keep_finished_job_s=keep_finished,
        )
    except K8sConfigError as exc:
        message = str(exc)
        # The renderer names its parameters; the user typed flags.
        for key, flag in (
            ("queue:", "--queue:"),
            ("keep_failed_cluster_s:", "--keep-failed-cluster:"),
            ("keep_finished_job_s:", "--keep-finished-job:"),
        ):
            if message.startswith(key):
                message = flag + message[len(key):]
        raise UserError(f"{message} ({Path(args.config).name}, overlay {args.overlay})") from None
    note = rayjob_name_note(run.name)
    if note:
        print(f"stoker: note: {note}", file=sys.stderr)
    return objects


def _seconds(flag: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        seconds = int(value)
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise UserError(f"{flag}: must be a whole number of seconds >= 0, got {value!r}")
    return seconds


def _render(args: argparse.Namespace) -> int:
    yaml.safe_dump_all(rendered_objects(args), sys.stdout, sort_keys=False)
    return 0


def _apply(args: argparse.Namespace) -> int:
    from stoker.cluster.k8s import client

    objects = rendered_objects(args)
    for obj in _k8s_call(client.apply, objects, args.namespace, dry_run=args.dry_run):
        meta = obj.get("metadata", {})
        print(f"{obj.get('kind', '?').lower()}/{meta.get('name')} applied"
              + (" (dry run)" if args.dry_run else ""))
    return 0


def _status(args: argparse.Namespace) -> int:
    from stoker.cluster.k8s import client

    state = _k8s_call(client.status, args.name, args.namespace, args.wait)
    line = state.state + (f": {state.reason}" if state.reason else "")
    if state.timed_out:
        line += f" (still {state.state} after {args.wait:g}s)"
    print(line)
    for pod, phase in sorted(state.pods.items()):
        print(f"  pod {pod}: {phase}")
    return {"succeeded": 0, "failed": 1}.get(state.state, 0 if not state.timed_out else 3)


def _delete(args: argparse.Namespace) -> int:
    from stoker.cluster.k8s import client

    deleted = _k8s_call(client.delete, args.name, args.namespace)
    print("\n".join(f"{what} deleted" for what in deleted) or "nothing to delete")
    return 0


def _k8s_call(function, *args, **kwargs):
    from stoker.cluster.k8s.render import K8sConfigError

    try:
        return function(*args, **kwargs)
    except K8sConfigError as exc:
        raise UserError(str(exc)) from None
