"""Shared fixtures: one local Ray cluster per session, sample data, run configs.

RAY_AUTH_MODE is read from the environment only, and a new local cluster would otherwise turn
token auth on and write a token file; tests choose explicitly.
"""

import os

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's preemption watcher is an extra actor process per training that polls for node
# drains; the test cluster's nodes are never drained.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Keep Ray from grabbing a dashboard port and from printing usage-stats prompts.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers take their credentials from their node, as on a real cluster (stoker keeps them
# out of trial runtime_envs): the session cluster starts with the loopback S3 server's dummy
# ones in its environment (the s3_server fixture sets the same for this process).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
# One `ninja` for every DeepSpeed JIT build of the suite: this environment's, the one
# tests.local_cluster.LocalCluster's nodes find first. torch runs `ninja` from PATH, and a
# different ninja (a system 1.11 next to the venv's 1.13) cannot read the other's build log, so
# each switch between the session cluster and a LocalCluster rebuilt the shared-memory comm and
# cpu_adam extensions in ~/.cache/torch_extensions (60-300 s each on 2 CPUs).
# The loopback S3 server (`moto_server`, tests/datasets/conftest.py) is the venv's pinned moto
# too, not whichever one another Python on PATH has.
import sys  # noqa: E402

_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray cluster shared by every test that needs one; stopped at the end."""
    import ray

    from stoker.cluster.connect import connect_embedded

    resources = connect_embedded(num_cpus=2)
    yield resources
    ray.shutdown()


_two_nodes: list = []
"""The running two-node cluster, while the tests that need it run (two_node_cluster)."""


@pytest.fixture
def two_node_cluster():
    """A real two-node Ray cluster on this machine (two `ray start` processes, tests.local_cluster)
    with token auth on, shared by the tests that need two nodes of one CPU each
    (tests/cluster/test_multinode.py, tests/datasets/test_prepare_multinode.py): one start-up
    for all of them instead of one each. They run one after another
    (pytest_collection_modifyitems), and the cluster stops after the last of them
    (pytest_runtest_teardown): an idle cluster takes CPU from the tests after it."""
    if not _two_nodes:
        import secrets
        import tempfile

        from tests.local_cluster import LocalCluster

        # A short path: Ray's Unix sockets live under the temp dir.
        directory = Path(tempfile.mkdtemp(prefix="stkmn", dir="/tmp"))
        # One CPU per node: 2 in all, like the session's single-node cluster. Ray Data sizes a
        # read by the cluster's CPU count, so with a split of several files the blocks (and which
        # rows each rank gets) could differ between clusters of different sizes.
        _two_nodes.append(LocalCluster(directory, num_nodes=2, cpus_per_node=1, token=secrets.token_hex(32)).start())
    return _two_nodes[0]


def _uses_two_nodes(item) -> bool:
    return "two_node_cluster" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
    """The tests on the two-node cluster run together, where the first of them is."""
    users = [item for item in items if _uses_two_nodes(item)]
    if len(users) > 1:
        first = items.index(users[0])
        rest = [item for item in items if not _uses_two_nodes(item)]
        items[:] = rest[:first] + users + rest[first:]


def _stop_two_nodes() -> None:
    # After its jobs, `ray start --block` can sit out the whole default grace period; a test
    # cluster's processes are killed after a short one.
    while _two_nodes:
        _two_nodes.pop().stop(grace_s=5)


def pytest_runtest_teardown(item, nextitem):
    if _two_nodes and (nextitem is None or not _uses_two_nodes(nextitem)):
        _stop_two_nodes()


def pytest_sessionfinish(session):
    _stop_two_nodes()  # interrupted while the cluster ran


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory) -> Path:
    """scikit-learn's bundled handwritten digits as a CSV (1797 rows, 64 pixels + target)."""
    from sklearn.datasets import load_digits

    path = tmp_path_factory.mktemp("raw") / "digits.csv"
    load_digits(as_frame=True).frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def prepared(digits_csv, tmp_path_factory) -> dict:
    """A run config (as a dict) whose digits dataset is prepared once per session; tests copy
    it with their own name and storage."""
    from stoker.config import parse_config
    from stoker.datasets.prepare import prepare

    output = tmp_path_factory.mktemp("prepared") / "digits"
    base = run_config(digits_csv, output, tmp_path_factory.mktemp("runs"))
    prepare(parse_config(base, "test").data)
    return base


@pytest.fixture(scope="session")
def finished_run(ray_cluster, prepared, tmp_path_factory):
    """One finished training of the session's digits (2 epochs at ZeRO-3: its parameters are
    sharded across the ranks, so reading its checkpoint merges them), as a TrainResult, for the
    tests that only read a finished run; one training instead of one each. A test that writes
    into the run (an export) works on its own copy: copy_run."""
    from stoker.config import parse_config
    from stoker.trainer.run import train

    config = dict(prepared, name="finished", storage=str(tmp_path_factory.mktemp("finished")))
    config["train"] = {**prepared["train"], "epochs": 2, "deepspeed": {"zero_stage": 3}}
    return train(parse_config(config, "test"))


def copy_run(run_dir: Path, directory: Path) -> Path:
    """A copy of a finished run's directory under `directory`, with the run's own name (its
    checkpoints name their run)."""
    import shutil

    return Path(shutil.copytree(run_dir, directory / run_dir.name))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`stoker ARGS` in this process: (exit code, stdout, stderr) of that command alone."""
    from stoker.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(directory: Path, config: dict, name: str = "run.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_config(source: Path, output: Path, storage: Path, **overrides) -> dict:
    """A small valid run config; `overrides` replace whole top-level sections."""
    config = {
        "name": "test-run",
        "storage": str(storage),
        "data": {"source": str(source), "label": "target", "output": str(output)},
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003},
                  "deepspeed": {"zero_stage": 2}},
        "scaling": {"num_workers": 2},
    }
    config.update(overrides)
    return config


def best_epoch_of(records: list[dict], metric: str = "val_accuracy", mode: str = "max") -> int:
    """The epoch the run's own rule (stoker.trainer.ranking.better) calls best, replayed over
    metrics.jsonl records in epoch order: what a run's reported best epoch must equal."""
    from stoker.trainer.ranking import Score, better

    best, best_epoch = None, None
    for record in records:
        score = Score(record[metric], record["val_loss"])
        if better(score, best, mode):
            best, best_epoch = score, record["epoch"]
    return best_epoch


def train_workers():
    """This test process's Ray Train worker processes (never another session's)."""
    found = []
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            pass  # an idle prestarted Ray worker that exited while we looked
    return found
