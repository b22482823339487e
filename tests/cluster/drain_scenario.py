"""A node drained mid-epoch on a real two-node Ray cluster (two `ray start` processes), as a
spot reclaim or a Kubernetes node drain does it: `ray drain-node` with a deadline, then the
node is killed once the run has checkpointed. Used by tests/cluster/test_drain.py (asserts)
and benchmarks/elastic.py (`drain_lost_steps`, `recovery_over_startup`).

The user's path, as typed: a project folder with relative paths in its config, and
`stoker train run.yaml` run there against the cluster (RAY_ADDRESS, as inside a Ray Job). The
run is elastic (`num_workers: [1, 2]`), one worker per node as their size decides (1.5 of a
node's 2 CPUs; the rest reads): Ray Train's elastic sizing counts workers by resources, not
placement.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from stoker.environment import patched_environ
from stoker.trainer.run_dir import Records
from tests.local_cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
BATCH = 16

CLUSTER_ENV = {
    # On, as for users (tests/conftest.py turns Ray Train's drain watcher off elsewhere).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
    # Ray's drain watcher looks every second instead of every 5 s: the drain lands within the
    # run's first epochs however fast they go.
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
    # Ray Train's elastic sizing sees the lost node late and first waits this long for the old
    # size (60 s by default, README): Ray's timeout, not stoker's drain handling.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
}


@dataclass
class Drained:
    code: int
    stderr: str
    records: Records
    project: Path
    worker_node: str
    """The drained node's Ray id."""
    events: list[dict]
    """The run's drain events (stoker.trainer.tracking.RunLog)."""
    startup_s: float
    """From `stoker train` to its first epoch record."""
    recovery_s: float
    """From the node's loss to the first epoch record on the node left."""
    regrow_s: float | None = None
    """With `rejoin`: from a new node's start to the first epoch record at two workers again."""


def epochs_of(records: Records) -> list[dict]:
    try:
        return records.metrics()
    except (OSError, ValueError):
        return []  # a line being written


def _wait(predicate, timeout_s: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"stoker train exited with {process.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def drained_run(source_csv: Path, workdir: Path, epochs: int, deadline_s: int, rejoin: bool = False) -> Drained:
    """The run of `epochs` epochs, its second node drained with `deadline_s` once it has
    trained an epoch, then lost. `rejoin`: once it trains on the node left, a new node joins;
    the run is stopped (SIGTERM, exit 130) at its first epoch back at two workers, since
    how long Ray takes to notice the node decides how many epochs that takes."""
    from stoker.config import parse_config
    from stoker.datasets.prepare import prepare
    from tests.conftest import run_config

    project = workdir / "project"
    project.mkdir()
    config = run_config(source_csv, Path("prepared/digits"), Path("runs"), name="drained")
    config["train"].update(epochs=epochs, batch_size=BATCH, deepspeed={"zero_stage": 1})
    config["scaling"] = {"num_workers": [1, 2], "cpus_per_worker": 1.5, "data_cpus": 0.5, "grow_check_s": 5}
    (project / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    os.chdir(project)  # the relative paths resolve in the project, as for a user there
    try:
        prepare(parse_config(config, "run.yaml").data)
    finally:
        os.chdir(REPO)

    with patched_environ(CLUSTER_ENV):
        cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="stkdr", dir="/tmp")), num_nodes=2, cpus_per_node=2).start()
    records = Records(project / "runs" / "drained")
    # The driver's environment too: Ray Train reads these where its controller starts.
    env = {**cluster.env(), **CLUSTER_ENV, "RAY_ADDRESS": cluster.gcs_address}
    env.pop("STOKER_REGISTRY_URL", None)
    with open(workdir / "train.err", "w") as err:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "stoker", "train", "run.yaml"], cwd=project, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait(lambda: epochs_of(records), 300, "the first epoch", process)
            startup_s = time.monotonic() - started
            worker_node = next(n["node_id"] for n in cluster.nodes() if not n["is_head_node"] and n["state"] == "ALIVE")
            cluster.drain(worker_node, deadline_s)
            events = _wait(lambda: [e for e in records.events() if e.get("event") == "preempted"], deadline_s + 10,
                           "the drain's checkpoint", process)
            # The reclaim itself, once the checkpoint is in; Ray Train restarts the group at the
            # deadline. (Killed at the deadline itself, the restart races Ray's view of the
            # cluster, refreshed every 20 s.)
            cluster.kill_node(cluster.processes[1])
            lost = time.monotonic()
            _wait(lambda: any(r.get("world_size") == 1 for r in epochs_of(records)), 300,
                  "an epoch on the node left", process)
            recovery_s = time.monotonic() - lost
            regrow_s = None
            if rejoin:
                with patched_environ(CLUSTER_ENV):
                    cluster.join_node()
                joined = time.monotonic()
                shrunk = max(r["epoch"] for r in epochs_of(records) if r.get("world_size") == 2)
                _wait(lambda: [r for r in epochs_of(records) if r["epoch"] > shrunk and r.get("world_size") == 2], 300,
                      "an epoch on two nodes again", process)
                regrow_s = time.monotonic() - joined
                process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=400)
        finally:
            if process.poll() is None:
                process.kill()
            cluster.stop(grace_s=5)
    return Drained(code, (workdir / "train.err").read_text(), records, project, worker_node, events, startup_s,
                   recovery_s, regrow_s)


def steps_of_drained_epoch(drained: Drained) -> tuple[int, int]:
    """(optimizer steps the drained epoch took, steps it should take): the steps before its
    checkpoint at 2 workers plus the rest of the epoch's share at 1 worker. Equal when no step
    was lost or trained twice."""
    (event,) = drained.events
    epochs = epochs_of(drained.records)
    steps_1 = -(-drained.records.dataset()["rows"]["train"] // BATCH)
    rest = steps_1 - round(event["micro_step"] / event["steps_in_epoch"] * steps_1)
    before = epochs[event["epoch"] - 1]["global_step"] if event["epoch"] else 0
    return epochs[event["epoch"]]["global_step"] - before, event["micro_step"] + rest
