"""Checkpoint files beyond DeepSpeed's shards: stoker state, per-rank RNG, checksums.

Each rank saves into its own temporary directory and Ray merges them into one checkpoint.
Every rank also writes `checksums_rank<r>.json` (SHA-256 of each file it wrote), so a resume
can tell a truncated or corrupted checkpoint from a good one before DeepSpeed unpickles it,
and fall back to the previous one. The checksums catch damage, not tampering (whoever can
write a shard can rewrite them too): `verify` then has every pickled file checked by
stoker.trainer.checkpoint_guard, which refuses one that would run code when loaded.

What stoker writes for itself is JSON, never a pickle: the training state, each rank's RNG
states and the checksums. Only DeepSpeed's own files (`ds/*.pt`) are pickles.
"""

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoker.trainer import checkpoint_guard as guard

CHECKPOINT_TAG = "ds"
STATE_FILE = "stoker_state.json"
CHECKSUMS = "checksums_rank{rank}.json"
RNG = "rng_rank{rank}.json"
CONVERTED = "consolidated"
"""A copy converted for another world size or ZeRO stage, inside the checkpoint it came from."""
CONVERTED_SUMS = "checksums.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def stoker_state(state: dict[str, Any], engine) -> dict[str, Any]:
    """The training state plus the shape of the job that saved it: a resume at another world
    size or ZeRO stage converts the checkpoint (stoker.trainer.checkpoint_resize), one whose
    model's parameters differ is refused before any worker starts, and the learning-rate
    schedule continues from the optimizer steps already taken."""
    import torch.distributed as dist

    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()}
    return {**state, "world_size": dist.get_world_size(), "zero_stage": int(engine.zero_optimization_stage()),
            "global_steps": int(engine.global_steps), "parameters": shapes}


def finish(directory: Path, rank: int, state: dict[str, Any] | None) -> None:
    """Write this rank's RNG (and, on rank 0, the training state), then checksum every file
    this rank wrote into `directory` (run after DeepSpeed's save_checkpoint)."""
    (directory / RNG.format(rank=rank)).write_text(json.dumps(rng_state()))
    if state is not None:
        (directory / STATE_FILE).write_text(json.dumps(state))
    sums = {
        str(p.relative_to(directory)): sha256(p)
        for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith("checksums_rank")
    }
    (directory / CHECKSUMS.format(rank=rank)).write_text(json.dumps(sums, indent=1))


def verify(directory: Path) -> str | None:
    """None if every file listed by every rank's checksums is present and intact; otherwise
    what is wrong, naming the file (a damaged checkpoint: the caller may fall back to an
    earlier one). An intact checkpoint whose pickles would be unsafe to load (a type outside
    the allow-list, a shard of another checkpoint) raises `UserError` instead: a tampered run
    directory is not something to work around silently."""
    manifests = sorted(directory.glob("checksums_rank*.json"))
    if not manifests:
        return "no checksums (not a complete stoker checkpoint)"
    # The record of a conversion for another world size or ZeRO stage
    # (stoker.trainer.checkpoint_resize) has checksums of its own.
    if (directory / CONVERTED).exists():
        manifests.append(directory / CONVERTED / CONVERTED_SUMS)
    for manifest in manifests:
        problem = check_sums(manifest, directory)
        if problem:
            return problem
    if not (directory / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    try:
        state = read_state(directory)
    except ValueError:
        return f"{STATE_FILE} is unreadable"
    expected = (state["run"], int(state["epoch"])) if "run" in state and "epoch" in state else None
    guard.check_checkpoint(directory, expected)
    return None


def check_sums(manifest: Path, root: Path) -> str | None:
    """None if every file `manifest` lists (relative to its own directory) is intact, else
    what is wrong, naming the file relative to `root`."""
    where = manifest.parent
    try:
        sums = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return f"{manifest.relative_to(root)} is missing or unreadable"
    for name, expected in sums.items():
        path = where / name
        if not path.is_file():
            return f"{path.relative_to(root)} is missing"
        if sha256(path) != expected:
            return f"{path.relative_to(root)} fails its SHA-256 check (truncated or corrupted)"
    return None


def epoch_of(directory: Path) -> int:
    try:
        return int(json.loads((directory / STATE_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return -1


def is_partial(directory: Path) -> bool:
    """A node drain's just-in-time checkpoint, taken mid-epoch (stoker.trainer.preemption): its
    state is the last whole epoch's, its weights are later, so it is never a best epoch's."""
    try:
        return bool(read_state(directory).get("partial"))
    except (OSError, ValueError):
        return False


def local_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run on a local/shared filesystem, newest epoch first."""
    found = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    return sorted(found, key=lambda p: (epoch_of(p), p.name), reverse=True)


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE_FILE).read_text())


def restore_rng(directory: Path, rank: int) -> None:
    path = directory / RNG.format(rank=rank)
    if path.is_file():  # absent when the run resumes with more workers than it saved
        set_rng_state(json.loads(path.read_text()))
