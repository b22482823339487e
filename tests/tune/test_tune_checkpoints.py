"""Tune pointer checkpoints that a killed driver's experiment snapshot may still name."""

import json

from stoker.tune.checkpoints import POINTER, restore_deleted_pointers


def pointer_dir(path, epoch):
    path.mkdir(parents=True)
    (path / POINTER).write_text(json.dumps({"path": f"/runs/t/checkpoint_{epoch}", "run_dir": "/runs/t", "epoch": epoch}))


def test_the_pointer_deleted_before_the_last_snapshot_is_put_back(tmp_path):
    pointer_dir(tmp_path / "a" / "checkpoint_000002", 2)  # 000001 deleted, maybe still named
    pointer_dir(tmp_path / "b" / "checkpoint_000000", 0)  # nothing before the first
    pointer_dir(tmp_path / "c" / "checkpoint_000000", 0)
    pointer_dir(tmp_path / "c" / "checkpoint_000001", 1)  # both there: nothing to do
    (tmp_path / "d").mkdir()  # a trial that never checkpointed
    (tmp_path / "experiment_state.json").write_text("{}")

    assert restore_deleted_pointers(tmp_path) == [tmp_path / "a" / "checkpoint_000001"]
    # The copy points where the latest does: the trial's Train run resumes from its own latest.
    restored = json.loads((tmp_path / "a" / "checkpoint_000001" / POINTER).read_text())
    assert restored["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoint_000001", "checkpoint_000002"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["checkpoint_000000", "checkpoint_000001"]
    assert restore_deleted_pointers(tmp_path) == []  # idempotent: a second resume adds nothing
