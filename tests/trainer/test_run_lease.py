"""One writer per run (stoker.trainer.run_lease): a live lease refuses a second driver, a dead
driver's lease is taken over, and racing drivers never both win, on local storage and on the
loopback S3 server (conditional writes)."""

import json
import socket
import subprocess
import sys
import time

import pytest

from stoker.errors import UserError
from stoker.trainer import run_lease
from stoker.trainer.run_dir import locate
from tests.conftest import REPO
from tests.datasets.conftest import bucket, s3_server  # noqa: F401 - fixtures


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lease(run, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": _dead_pid(), "token": "t", "since": "2026-01-01T00:00:00+00:00",
              "heartbeat": time.time(), "attempt": 1, "submission_id": None, **fields}
    store = run_lease.store_for(run)
    assert store.create(json.dumps(holder)) is not None


def test_a_live_lease_refuses_a_second_driver_in_one_line_and_release_frees_it(tmp_path):
    run = locate(str(tmp_path), "r1")
    lease = run.take_lease("r1")
    try:
        with pytest.raises(UserError) as refused:
            run.take_lease("r1")
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith("run r1 is being trained by pid ")
        assert f"on {socket.gethostname()} (attempt 1) since {lease.holder.since}" in message
        assert str(tmp_path / "r1" / run_lease.LEASE) in message
    finally:
        lease.release()
    assert not (tmp_path / "r1" / run_lease.LEASE).exists()
    run.take_lease("r1").release()  # free again


def test_a_dead_drivers_lease_is_taken_over_and_said(tmp_path):
    run = locate(str(tmp_path), "r2")
    _write_lease(run)
    said: list[str] = []
    lease = run.take_lease("r2", say=said.append)
    try:
        assert lease.holder.attempt == 2
        assert len(said) == 1 and said[0].startswith("run r2: taking over the lease of pid ")
        assert "is gone" in said[0]
        assert json.loads((tmp_path / "r2" / run_lease.LEASE).read_text())["token"] == lease.holder.token
    finally:
        lease.release()


def test_a_silent_holder_elsewhere_is_stale_only_after_its_heartbeat_stops(tmp_path):
    run = locate(str(tmp_path), "r3")
    _write_lease(run, host="another-node", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(UserError, match=r"being trained by pid 1 on another-node"):
        run.take_lease("r3")
    (tmp_path / "r3" / run_lease.LEASE).unlink()
    _write_lease(run, host="another-node", pid=1, heartbeat=time.time() - run_lease.STALE_AFTER_S - 5)
    said: list[str] = []
    run.take_lease("r3", say=said.append).release()
    assert "no heartbeat for" in said[0]


def test_release_leaves_a_lease_another_driver_took_over(tmp_path):
    run = locate(str(tmp_path), "r4")
    lease = run.take_lease("r4")
    path = tmp_path / "r4" / run_lease.LEASE
    other = {**json.loads(path.read_text()), "token": "theirs", "host": "another-node"}
    path.write_text(json.dumps(other))  # what a driver that took over would have written
    lease.renew()
    assert lease.lost is not None and "taken by another driver" in lease.lost
    lease.release()
    assert json.loads(path.read_text())["token"] == "theirs"


def test_a_file_that_is_not_a_lease_names_itself_and_how_to_remove_it(tmp_path):
    run = locate(str(tmp_path), "r5")
    (tmp_path / "r5").mkdir()
    (tmp_path / "r5" / run_lease.LEASE).write_text("{not json")
    with pytest.raises(UserError) as refused:
        run.take_lease("r5")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'r5' / run_lease.LEASE}: not a stoker lease")
    assert "if no stoker process is training run r5, delete it (rm " in message and "\n" not in message


def test_fresh_removal_keeps_the_lease_of_the_driver_that_asked(tmp_path):
    run = locate(str(tmp_path), "r6")
    lease = run.take_lease("r6")
    (tmp_path / "r6" / "checkpoint_x").mkdir()
    (tmp_path / "r6" / "metrics.jsonl").write_text("{}\n")
    run.remove()
    assert [p.name for p in (tmp_path / "r6").iterdir()] == [run_lease.LEASE]
    lease.release()


_RACE = """
import sys, time
from stoker.errors import UserError
from stoker.trainer.run_dir import locate
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    lease = locate(sys.argv[1], "raced").take_lease("raced")
except UserError as exc:
    print("refused", exc)
else:
    taken = time.time()
    time.sleep(4)
    released = time.time()
    lease.release()
    print("won", taken, released, flush=True)
"""


def test_drivers_that_start_together_never_hold_the_lease_at_once(tmp_path):
    start = time.time() + 4  # every interpreter is up by then, as a rule
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), str(start)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    held = sorted((float(t), float(r)) for out in outs if out.startswith("won") for t, r in [out.split()[1:3]])
    refused = [out for out in outs if out.startswith("refused")]
    # One at a time: a driver that came up after the holder released may take it in turn.
    assert held and all(earlier[1] <= later[0] for earlier, later in zip(held, held[1:], strict=False)), held
    assert len(held) + len(refused) == 6 and refused, outs
    assert all(out.startswith("refused run raced is being trained by pid") for out in refused), refused


def test_on_s3_the_lease_uses_conditional_writes(bucket):  # noqa: F811 - the fixture
    from stoker.datasets.config import S3Config

    endpoint, name, client = bucket
    run = locate(f"s3://{name}/runs", "s1", S3Config(endpoint_url=endpoint))
    lease = run.take_lease("s1")
    key = f"runs/s1/{run_lease.LEASE}"
    assert json.loads(client.get_object(Bucket=name, Key=key)["Body"].read())["token"] == lease.holder.token
    with pytest.raises(UserError, match=rf"^run s1 is being trained by .*s3://{name}/runs/s1/{run_lease.LEASE}"):
        run.take_lease("s1")
    store = run_lease.store_for(run)
    # A create-if-absent on an existing lease and a replace with a stale ETag both lose.
    assert store.create("{}") is None
    assert store.replace("{}", '"0123456789abcdef0123456789abcdef"') is None
    lease.renew()
    assert lease.lost is None
    lease.release()
    assert client.list_objects_v2(Bucket=name, Prefix=key).get("KeyCount", 0) == 0
    assert not (run.local / run_lease.LEASE).exists()  # never in the mirrored staging copy
