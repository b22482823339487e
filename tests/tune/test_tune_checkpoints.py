"""What a killed driver leaves for the resume: Tune pointer checkpoints its experiment snapshot may
still name, and a snapshot cut short while Tune copied it."""

import json
import os
import pickle
import shutil
from types import SimpleNamespace

from stoker.tune.checkpoints import (
    POINTER,
    SNAPSHOT_COPY,
    KeepsLastSnapshot,
    recover_snapshot,
    restore_deleted_pointers,
)


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


def test_a_snapshot_cut_by_the_drivers_end_gives_way_to_the_last_whole_one(tmp_path):

    staging, experiment = tmp_path / "staging", tmp_path / "experiment"
    staging.mkdir()
    experiment.mkdir()
    trial = SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))

    keeper = KeepsLastSnapshot(experiment)
    keeper.setup()
    keeper.LIST_EVERY_S = 0  # (once a second in a search)

    def snapshot(n: int) -> None:  # as Tune writes one in its staging directory
        (staging / "experiment_state-s2.json").write_text(json.dumps({"snapshot": n}))
        (staging / "searcher-state-s2.pkl").write_bytes(pickle.dumps({"snapshot": n}))
        written = int((keeper._started + n) * 10**9)
        os.utime(staging / "experiment_state-s2.json", ns=(written, written))

    # An earlier driver's, in the experiment and (a resumed search downloads it) in staging.
    for directory in (experiment, staging):
        (directory / "experiment_state-s1.json").write_text(json.dumps({"snapshot": 0}))
    os.utime(staging / "experiment_state-s1.json", ns=(0, 0))
    keeper.on_step_end(0, [])  # no trials yet: nothing to keep
    keeper.on_step_end(0, [trial])  # only the earlier driver's snapshot: nothing of this one yet
    assert not (experiment / SNAPSHOT_COPY).exists()
    snapshot(1)  # this driver's first, which the keeper finds
    keeper.on_step_end(1, [trial])
    snapshot(2)
    keeper.on_step_end(2, [trial])
    kept = experiment / SNAPSHOT_COPY
    assert json.loads((kept / "experiment_state-s2.json").read_text()) == {"snapshot": 2}
    assert pickle.loads((kept / "searcher-state-s2.pkl").read_bytes()) == {"snapshot": 2}

    # Tune's syncer copied snapshot 2 whole: nothing to do on a resume.
    for name in ("experiment_state-s2.json", "searcher-state-s2.pkl"):
        (experiment / name).write_bytes((staging / name).read_bytes())
    assert recover_snapshot(experiment) == []
    # Killed inside the copy of snapshot 3: its experiment state cut, its searcher written.
    snapshot(3)
    (experiment / "experiment_state-s2.json").write_text(json.dumps({"snapshot": 3})[:7])
    (experiment / "searcher-state-s2.pkl").write_bytes(pickle.dumps({"snapshot": 3}))
    assert recover_snapshot(experiment) == ["experiment_state-s1.json", "experiment_state-s2.json",
                                            "searcher-state-s2.pkl"]
    # One whole set, the searcher as old as the experiment state (a newer searcher than the
    # trials it knows fails the resume).
    assert json.loads((experiment / "experiment_state-s2.json").read_text()) == {"snapshot": 2}
    assert pickle.loads((experiment / "searcher-state-s2.pkl").read_bytes()) == {"snapshot": 2}
    assert json.loads((experiment / "experiment_state-s1.json").read_text()) == {"snapshot": 0}

    # A cut pickle counts as cut too; with no copy kept, the cut file goes (Tune then reads the
    # newest whole one).
    (experiment / "searcher-state-s2.pkl").write_bytes(pickle.dumps({"snapshot": 4})[:-3])
    shutil.rmtree(kept)
    assert recover_snapshot(experiment) == []
    assert not (experiment / "searcher-state-s2.pkl").exists()
