"""A real multi-node Ray cluster on one machine: a head and worker nodes, each its own
`ray start --block` process, for tests and benchmarks of the remote path (Jobs API, token auth,
placement across nodes) without a cloud. Test code, not part of the package (its users start
their clusters with `ray start`, KubeRay or `stoker k8s`).

Each node gets its own ports and the cluster its own temp dir, so it neither collides with nor
becomes the default cluster (`/tmp/ray/ray_current_cluster`) of other Ray users on the machine.
`stop()` ends exactly the processes it started: SIGTERM to each `ray start` (which drains and
stops its node's processes), then SIGKILL to each one's process group if anything is left.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.ports import free_port


@dataclass
class LocalCluster:
    """Start with `start()`, or use as a context manager. `token`: run with Ray token auth."""

    directory: Path
    num_nodes: int = 2
    cpus_per_node: int = 2
    token: str | None = None
    object_store_mb: int = 200
    processes: list[subprocess.Popen] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    _added: int = 0

    @property
    def address(self) -> str:
        """The Jobs API URL."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["RAY_TRAIN_V2_ENABLED"] = "1"
        # Jobs run `python`: the nodes' PATH leads to this environment, as a cluster image's would.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if self.token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
            env.pop("RAY_AUTH_TOKEN", None)
        return env

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _node_args(self) -> list[str]:
        # Every per-node listener on its own free port: two nodes share this machine.
        return [
            f"--num-cpus={self.cpus_per_node}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--disable-usage-stats", "--block",
        ]

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        ray = str(Path(sys.executable).with_name("ray"))
        log = open(self.directory / log_name, "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [ray, "start", *args], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() can end all it started
        )
        self.processes.append(process)
        return process

    def start(self, timeout_s: float = 120) -> "LocalCluster":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        temp_dir = self.directory / "ray"
        try:
            self._spawn([
                "--head", f"--port={self.gcs_port}", f"--temp-dir={temp_dir}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                *self._node_args(),
            ], "head.log")
            self.wait_for_nodes(1, timeout_s)
            for _ in range(1, self.num_nodes):
                self.add_node()
            self.wait_for_nodes(self.num_nodes, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self) -> subprocess.Popen:
        """Start one more worker node (a node joining, as a replacement spot instance does);
        `wait_for_nodes` says when it is alive."""
        self._added += 1
        # Its own temp dir, as on a separate machine: nodes sharing one would share (and
        # garbage-collect) each other's unpacked runtime_env working directories.
        return self._spawn([f"--address={self.gcs_address}", f"--temp-dir={self.directory / f'n{self._added}'}",
                            *self._node_args()], f"worker{self._added}.log")

    def join_node(self, timeout_s: float = 120, attempts: int = 4) -> subprocess.Popen:
        """`add_node` and wait until it is alive. A `ray start` gives its raylet 30 s to register
        (hard-coded in Ray 2.60), which a loaded 2-CPU machine can miss: tried `attempts` times."""
        alive = sum(n["state"] == "ALIVE" for n in self.nodes())
        for attempt in range(attempts):
            process = self.add_node()
            try:
                self.wait_for_nodes(alive + 1, timeout_s)
                return process
            except RuntimeError:
                if process.poll() is None or attempt == attempts - 1:
                    raise
                self.processes.remove(process)  # it timed out during startup: start another
        raise AssertionError("unreachable")

    def kill_node(self, process: subprocess.Popen) -> None:
        """Take a worker node away at once, as a reclaimed spot instance goes: SIGKILL to its
        `ray start` and every process it started (raylet, workers)."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
        self.processes.remove(process)

    def drain(self, node_id: str, deadline_s: int, message: str = "spot instance reclaimed") -> None:
        """Tell Ray that a node will be taken away in `deadline_s` seconds (a preemption
        notice), through `ray drain-node`, the path Ray's autoscaler and KubeRay take."""
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "drain-node", f"--address={self.gcs_address}", f"--node-id={node_id}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", f"--reason-message={message}",
                        f"--deadline-remaining-seconds={deadline_s}"],
                       env=self.env(), check=True, capture_output=True, timeout=60)

    def nodes(self) -> list[dict]:
        response = requests.get(f"{self.address}/api/v0/nodes", headers=self.headers(), timeout=5)
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {process.returncode}; see {self.directory}/*.log")
            try:
                if sum(n["state"] == "ALIVE" for n in self.nodes()) >= count:
                    return
            except (requests.RequestException, KeyError, ValueError):
                pass  # the dashboard is still starting
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} Ray nodes not alive after {timeout_s}s; see {self.directory}/*.log")
            time.sleep(0.25)  # a node is seconds away: a coarser look adds up to its period to each wait

    def stop(self, grace_s: float = 30) -> None:
        # Every node told at once (workers first, then the head), each by the pid and process
        # group we started, and one grace period for all of them: a `ray start` takes seconds to
        # stop its node, and one node after another those seconds added up.
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait(timeout=10)
        self.processes.clear()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
