"""A run directory never runs code: every pickle in a checkpoint is checked before anything
unpickles it (stoker.trainer.checkpoint_guard).

Crafted checkpoints, each with its checksums recomputed as whoever tampered with it would:
a shard whose unpickling runs a shell command (the command would create a marker file; the
marker stays absent), a shard holding an unexpected class, a truncated shard, and a shard of
another run's checkpoint. Each is refused in one line naming the file, by `stoker export`
(exit 2, no `export/` left behind), by `stoker train` on the existing run, and by the check
the workers' resume makes, on local storage and on the loopback S3 server (there also where
it lies, before anything downloads it). Real DeepSpeed checkpoints of ZeRO 0-3 pass the check, load with PyTorch's
own restricted unpickler under the same allow-list, export bit-identically and resume
bit-identically (tests/trainer/ds_checkpoints.py writes them, without Ray).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stoker.errors import UserError
from stoker.trainer import checkpoint_guard as guard
from stoker.trainer import checkpoints as ckpt
from tests.conftest import REPO, run_cli
from tests.datasets.conftest import s3_server  # noqa: F401 - the fixture
from tests.trainer import ds_checkpoints


class RunsShell:
    """Unpickling this runs a shell command: what the issue's attacker added to a shard."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def recompute_checksums(directory: Path) -> None:
    """What anyone who can write a shard can do: make the checksums agree with it again."""
    for manifest in directory.glob("checksums_rank*.json"):
        sums = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({name: ckpt.sha256(directory / name) for name in sums}, indent=1))


def resave(path: Path, change) -> None:
    """Rewrite a (trusted, our own) torch.save file with `change` applied to its contents."""
    with torch.serialization.safe_globals(guard.allowed_objects()):
        content = torch.load(path, map_location="cpu", weights_only=True)
    change(content)
    torch.save(content, path)


# --- fast: the check itself, on small torch.save files ---


def write_checkpoint(directory: Path, content: dict, run: str = "r", epoch: int = 3) -> Path:
    (directory / "ds").mkdir(parents=True)
    torch.save(content, directory / "ds" / "mp_rank_00_model_states.pt")
    ckpt.finish(directory, 0, {"run": run, "epoch": epoch})
    return directory


def refusal(directory: Path) -> str:
    with pytest.raises(UserError) as refused:
        ckpt.verify(directory)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    shard = write_checkpoint(tmp_path / "c", {"module": {"w": torch.ones(2)}, "x": RunsShell(marker)})
    message = refusal(shard)
    assert message.startswith(f"{shard / 'ds' / 'mp_rank_00_model_states.pt'}: refused")
    assert "posix.system" in message and not marker.exists()
    # PyTorch's restricted unpickler, under the same allow-list, refuses it too.
    with pytest.raises(Exception, match="posix.system"), torch.serialization.safe_globals(guard.allowed_objects()):
        torch.load(shard / "ds" / "mp_rank_00_model_states.pt", weights_only=True)
    assert not marker.exists()
    # The file is what the test claims: an unrestricted load runs the command.
    torch.load(shard / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()


def test_unexpected_classes_opcodes_and_truncation_are_named(tmp_path):
    linear = write_checkpoint(tmp_path / "a", {"module": torch.nn.Linear(2, 2)})
    assert "it asks for torch.nn.modules.linear.Linear, which is not a type" in refusal(linear)
    cut = write_checkpoint(tmp_path / "b", {"module": {"w": torch.ones(1000)}})
    shard = cut / "ds" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    recompute_checksums(cut)
    assert "truncated or corrupt" in refusal(cut)
    # A raw pickle (not a torch.save archive) and a pickle that calls what it did not import.
    raw = write_checkpoint(tmp_path / "c", {})
    (raw / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02}q\x00.")
    recompute_checksums(raw)
    assert "a raw pickle" in refusal(raw)
    with pytest.raises(guard.Refused, match="opcode INST"):
        guard.pickle_globals(b"(ios\nsystem\n(S'true'\ntR.")
    with pytest.raises(guard.Refused, match="asks for builtins.eval"):
        guard.pickle_globals(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.")


def test_a_shard_stamped_for_another_checkpoint_is_refused(tmp_path):
    stamped = {"module": {"w": torch.ones(2)}, "ds_config": {guard.STAMP_KEY: guard.stamp_of("r", 3)}}
    good = write_checkpoint(tmp_path / "good", stamped)
    assert ckpt.verify(good) is None
    other = write_checkpoint(tmp_path / "other", {**stamped, "ds_config": {guard.STAMP_KEY: guard.stamp_of("b", 3)}})
    assert "it belongs to another checkpoint (run 'b' epoch 3), not this one (run 'r' epoch 3)" in refusal(other)
    older = write_checkpoint(tmp_path / "older", {**stamped, "ds_config": {guard.STAMP_KEY: guard.stamp_of("r", 1)}})
    assert "(run 'r' epoch 1), not this one (run 'r' epoch 3)" in refusal(older)


# --- real DeepSpeed checkpoints (ZeRO 0-3), written once per module in a subprocess ---


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ds-checkpoints")
    subprocess.run([sys.executable, "-m", "tests.trainer.ds_checkpoints", str(out)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    return out, {r["config"]["stage"]: r for r in json.loads((out / "results.json").read_text())}


@pytest.mark.slow
def test_every_zero_stage_passes_loads_restricted_and_resumes_and_exports_bit_identically(real):
    from stoker.trainer.export import consolidated_state_dict

    out, results = real
    assert sorted(results) == [0, 1, 2, 3]
    for stage, result in results.items():
        directory = out / result["name"] / "checkpoint_0"
        assert ckpt.verify(directory) is None
        for path in guard.pickled_files(directory):
            # PyTorch's own restricted unpickler agrees: the same allow-list loads every file.
            with torch.serialization.safe_globals(guard.allowed_objects()):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        assert result["resume_restores"] and result["resume_bit_identical"], result["name"]
        saved = torch.load(out / result["name"] / "saved_weights.pt", weights_only=True)
        exported = consolidated_state_dict(directory, stage)
        assert exported.keys() == saved.keys()
        assert all(torch.equal(exported[k], saved[k]) for k in saved), result["name"]


CRAFTS = ("runs code", "unexpected class", "truncated", "other run")


def craft(kind: str, checkpoint: Path, other: Path, marker: Path) -> tuple[str, str]:
    """Tamper with a ZeRO-2 checkpoint and recompute its checksums; (the file, what the
    refusal must say)."""
    ds = checkpoint / "ds"
    states, optim = ds / "mp_rank_00_model_states.pt", ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if kind == "runs code":
        resave(states, lambda content: content.update(extra=RunsShell(marker)))
        target, says = states, "it asks for posix.system"
    elif kind == "unexpected class":
        resave(optim, lambda content: content.update(extra=torch.nn.Linear(2, 2)))
        target, says = optim, "it asks for torch.nn.modules.linear.Linear"
    elif kind == "truncated":
        optim.write_bytes(optim.read_bytes()[: optim.stat().st_size - 300])
        target, says = optim, "truncated or corrupt"
    else:
        shutil.copy(other / "ds" / optim.name, optim)
        target, says = optim, (f"it belongs to another checkpoint (run {ds_checkpoints.OTHER!r} epoch 0), "
                               f"not this one (run {ds_checkpoints.RUN!r} epoch 0)")
    recompute_checksums(checkpoint)
    return f"{target.relative_to(checkpoint)}", says


def make_run(real, prepared, root: Path, storage: str, s3: dict | None = None) -> Path:
    """A run directory (the digits' records) holding the real ZeRO-2 checkpoint."""
    import yaml

    out, results = real
    run_dir = root / ds_checkpoints.RUN
    shutil.copytree(out / results[2]["name"] / "checkpoint_0", run_dir / "checkpoint_0")
    config = {**prepared, "name": ds_checkpoints.RUN, "storage": storage,
              "model": {"name": "mlp", "hidden": ds_checkpoints.HIDDEN},
              "train": {**prepared["train"], "deepspeed": {"zero_stage": 2}}}
    if s3:
        config["data"] = {**config["data"], "s3": s3}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "run.yaml").write_text(yaml.safe_dump(config))  # what a user trains it with
    (run_dir / "dataset.json").write_text(json.dumps({"path": prepared["data"]["output"]}))
    return run_dir


def assert_refused(code: int, err: str, file: str, says: str, marker: Path) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{file}: refused to load this checkpoint file: " in err and says in err, err
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_checkpoints_are_refused_by_export_train_and_resume_on_local_storage(real, prepared, tmp_path, capsys,
                                                                                     ray_cluster):
    out, results = real
    # Clean: exported and evaluated.
    clean = make_run(real, prepared, tmp_path / "clean", str(tmp_path / "clean"))
    code, _, err = run_cli(capsys, "export", str(clean))
    assert code == 0, err
    code, text, err = run_cli(capsys, "evaluate", str(clean), "--data", prepared["data"]["output"], "--json")
    assert code == 0 and json.loads(text)["rows"] > 0, err
    for kind in CRAFTS:
        root = tmp_path / kind.replace(" ", "-")
        run_dir = make_run(real, prepared, root, str(root))
        marker = tmp_path / f"{kind}.ran"
        file, says = craft(kind, run_dir / "checkpoint_0", out / results[2]["name"] / ds_checkpoints.OTHER / "checkpoint_0",
                           marker)
        code, _, err = run_cli(capsys, "export", str(run_dir))
        assert_refused(code, err, file, says, marker)
        assert not (run_dir / "export").exists() and not list(run_dir.glob(".export*")), kind
        # `stoker train` on the existing run: refused before anything trains or is recorded.
        code, _, err = run_cli(capsys, "train", str(run_dir / "run.yaml"))
        assert_refused(code, err, file, says, marker)
        assert not (run_dir / "metrics.jsonl").exists()
        # The workers' resume (stoker.trainer.loop._resume) verifies each candidate before
        # anything loads it: refused there too.
        with pytest.raises(UserError, match="refused to load this checkpoint file") as refused:
            ckpt.verify(run_dir / "checkpoint_0")
        assert says in str(refused.value) and not marker.exists()


@pytest.mark.slow
def test_crafted_checkpoints_are_refused_on_s3(real, prepared, tmp_path, capsys, monkeypatch, s3_server):  # noqa: F811
    import boto3

    from stoker.datasets.config import S3Config
    from stoker.trainer.run_dir import STAGING_ENV, at

    out, results = real
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = "stoker-guard"
    client.create_bucket(Bucket=bucket)
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    # The clean checkpoint passes the check on S3 as it does locally.
    clean = out / results[2]["name"] / "checkpoint_0"
    for path in clean.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"clean/checkpoint_0/{path.relative_to(clean).as_posix()}")
    import fsspec

    s3fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    guard.check_remote_checkpoint(s3fs, f"{bucket}/clean/checkpoint_0", f"s3://{bucket}/clean/checkpoint_0")
    # The shard that would run a command: what the S3 paths add is where the check runs (in
    # place, before a download; export; the driver), the same for every kind, and the local test
    # above refuses all four kinds (each kind here cost the suite about a minute).
    for kind in CRAFTS[:1]:
        storage = f"s3://{bucket}/{kind.replace(' ', '-')}"
        run_dir = make_run(real, prepared, tmp_path / kind.replace(" ", "-"), storage, {"endpoint_url": s3_server})
        marker = tmp_path / f"{kind}.ran"
        file, says = craft(kind, run_dir / "checkpoint_0", out / results[2]["name"] / ds_checkpoints.OTHER / "checkpoint_0",
                           marker)
        prefix = f"{kind.replace(' ', '-')}/{ds_checkpoints.RUN}"
        for path in run_dir.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(run_dir).as_posix()}")
        # This machine trained it: its staging copy has the config (endpoint and all).
        staged = tmp_path / "staging" / bucket / prefix
        staged.mkdir(parents=True)
        shutil.copy(run_dir / "config.yaml", staged / "config.yaml")
        output = tmp_path / f"{kind}-export"
        code, _, err = run_cli(capsys, "export", f"{storage}/{ds_checkpoints.RUN}", "--output", str(output))
        assert_refused(code, err, file, says, marker)
        assert not output.exists() and not list(tmp_path.glob(f".{output.name}*")), kind
        remote = at(f"{storage}/{ds_checkpoints.RUN}", S3Config(endpoint_url=s3_server))
        # Checked where it lies, before a resume downloads it (range reads of data.pkl only).
        with pytest.raises(UserError, match="refused to load this checkpoint file") as refused:
            guard.check_remote_checkpoint(remote._fs(), f"{bucket}/{prefix}/checkpoint_0", remote.checkpoint_uri("checkpoint_0"))
        assert str(refused.value).startswith(f"{remote.checkpoint_uri('checkpoint_0')}/{file}: ") and says in str(refused.value)
        # `stoker train` on it: the driver refuses it before Ray starts any worker.
        from stoker.trainer.run import _resume_epoch_on_s3

        with pytest.raises(UserError, match="refused to load this checkpoint file"):
            _resume_epoch_on_s3(remote)
        # A resume on S3: Ray Train downloads the checkpoint and the worker checks it.
        local = remote.download_checkpoint("checkpoint_0", tmp_path / f"{kind}-download")
        with pytest.raises(UserError, match="refused to load this checkpoint file") as refused:
            ckpt.verify(local)
        assert says in str(refused.value) and not marker.exists()


def test_checksums_still_verify_after_recompute(tmp_path):
    """The crafting helper really recomputes the checksums (else the refusals above would be
    the SHA-256 check's, not the guard's)."""
    directory = write_checkpoint(tmp_path / "c", {"module": {"w": torch.ones(2)}})
    (directory / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"changed")
    assert "SHA-256" in ckpt.verify(directory)
    recompute_checksums(directory)
    assert hashlib.sha256(b"changed").hexdigest() in (directory / "checksums_rank0.json").read_text()
