"""Checksums catch truncated/corrupted checkpoint files; RNG state round-trips."""

import json
import random

import torch

from stoker.trainer import checkpoints as ckpt


def make(directory, epoch):
    directory.mkdir()
    torch.save({"module": {"w": torch.ones(250)}}, directory / "shard.pt")
    ckpt.finish(directory, 0, {"epoch": epoch})
    torch.save({"w": torch.zeros(2)}, directory / "other.pt")
    ckpt.finish(directory, 1, None)
    return directory


def test_intact_checkpoint_verifies_and_damage_is_named(tmp_path):
    good = make(tmp_path / "checkpoint_a", 0)
    assert ckpt.verify(good) is None
    with open(good / "shard.pt", "r+b") as handle:
        handle.truncate(600)
    assert ckpt.verify(good) == "shard.pt fails its SHA-256 check (truncated or corrupted)"
    gone = make(tmp_path / "checkpoint_b", 1)
    (gone / "other.pt").unlink()
    assert ckpt.verify(gone) == "other.pt is missing"
    assert ckpt.verify(tmp_path) == "no checksums (not a complete stoker checkpoint)"


def test_checkpoints_listed_newest_epoch_first(tmp_path):
    for name, epoch in [("checkpoint_x", 3), ("checkpoint_y", 7), ("checkpoint_z", 5)]:
        make(tmp_path / name, epoch)
    assert [p.name for p in ckpt.local_checkpoints(tmp_path)] == ["checkpoint_y", "checkpoint_z", "checkpoint_x"]


def test_rng_state_survives_json(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
