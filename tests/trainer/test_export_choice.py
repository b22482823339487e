"""Which checkpoint export takes, and the bad input it refuses (no DeepSpeed needed)."""

import json

import pytest
import yaml

from stoker.errors import UserError
from stoker.trainer import checkpoints as ckpt
from stoker.trainer.export import choose_checkpoint


def make_run(tmp_path, epochs_kept, best, name="mine", owner=None):
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": name}))
    for epoch in epochs_kept:
        directory = run_dir / f"checkpoint_{epoch:06d}"
        directory.mkdir()
        ckpt.finish(directory, 0, {"run": owner or name, "epoch": epoch, "best": {"epoch": best}})
    (run_dir / "final_metrics.json").write_text(json.dumps({"best_epoch": best}))
    return run_dir


def test_best_is_the_best_epochs_checkpoint_and_latest_the_newest(tmp_path):
    run_dir = make_run(tmp_path, [3, 7, 9], best=7)
    assert ckpt.epoch_of(choose_checkpoint(run_dir, "best")) == 7
    assert ckpt.epoch_of(choose_checkpoint(run_dir, "latest")) == 9


def test_a_missing_best_checkpoint_is_an_error_not_another_epoch(tmp_path):
    run_dir = make_run(tmp_path, [8, 9], best=4)
    with pytest.raises(UserError) as info:
        choose_checkpoint(run_dir, "best")
    assert "the best epoch's checkpoint (epoch 4) is gone" in str(info.value)
    assert "kept: epochs 8, 9; use --checkpoint latest" in str(info.value)


def test_a_checkpoint_from_another_run_is_refused(tmp_path):
    run_dir = make_run(tmp_path, [2], best=2, owner="theirs")
    with pytest.raises(UserError, match="belongs to run 'theirs', not to 'mine'"):
        choose_checkpoint(run_dir, "best")
