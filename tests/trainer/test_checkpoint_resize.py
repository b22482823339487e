"""A checkpoint saved at N workers and ZeRO stage s resumes at M workers and stage t, exactly.

The matrix runs real DeepSpeed engines, one process per rank (CPU, gloo, no Ray): a subset of
benchmarks/elastic.py's (which runs all of N -> M in {1,2,3} x {1,2,3} at ZeRO 0-3 and the
stage changes), on world sizes 1 and 2 only, since each process group costs a DeepSpeed import
per rank: 2 -> 1 at every stage, 1 -> 2 at ZeRO 3 (whose partitions pad), and ZeRO 1 -> 3,
3 -> 2 and 2 -> 0 across world sizes.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from stoker.config import parse_config
from stoker.errors import UserError
from stoker.trainer import checkpoint_resize as resize
from stoker.trainer import checkpoints as ckpt
from stoker.trainer.models import InputSpec
from tests.trainer import resize_cases

CASES = [(2, s, 1, s) for s in range(4)] + [(1, 3, 2, 3)]
CASES += [(2, 1, 1, 3), (1, 3, 2, 2), (1, 2, 2, 0)]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("resize")
    return out, resize_cases.run_matrix(out, CASES)


def test_resumes_at_another_world_size_and_stage_with_every_weight_and_optimizer_state_equal(matrix):
    _, results = matrix
    assert [tuple(r["case"]) for r in results] == sorted(CASES, key=lambda c: (c[2] != 2, c[2]))
    assert [r for r in results if not r["exact"]] == []
    for result in results:
        n, s, m, t = result["case"]
        # Converted only when DeepSpeed cannot load it as it is: ZeRO-0 loads at any world size.
        assert result["converted"] == (s != t or (s != 0 and n != m)), result


def _run_dir(out: Path, tmp_path: Path) -> Path:
    """A run directory with two copies of the 2-worker ZeRO-2 source checkpoint."""
    run_dir = tmp_path / "run"
    for name in ("checkpoint_a", "checkpoint_b"):
        shutil.copytree(out / "n2-z2" / "checkpoint_0", run_dir / name)
    return run_dir


def _run(prepared, hidden: list[int], workers: int = 1, stage: int = 2):
    config = dict(prepared, model={"name": "mlp", "hidden": hidden}, scaling={"num_workers": workers},
                  train={**prepared["train"], "deepspeed": {"zero_stage": stage}})
    return parse_config(config, "test"), InputSpec("tabular", (64,), 10, "classification")


def test_driver_converts_once_and_falls_back_from_a_damaged_conversion(matrix, prepared, tmp_path):
    from stoker.trainer.run import _check_checkpoints

    run_dir = _run_dir(matrix[0], tmp_path)
    run, spec = _run(prepared, resize_cases.HIDDEN)
    assert _check_checkpoints(run_dir, run, spec) == ([], 1, 2)  # the steps taken, for the schedule
    newest = ckpt.local_checkpoints(run_dir)[0]
    converted = newest / resize.CONVERTED
    assert resize.verify(converted) is None and ckpt.verify(newest) is None  # the guard accepts it
    assert not (ckpt.local_checkpoints(run_dir)[1] / resize.CONVERTED).exists()  # only the one resumed
    written = converted.stat().st_mtime_ns
    _check_checkpoints(run_dir, run, spec)
    assert converted.stat().st_mtime_ns == written  # converted once, kept

    with open(converted / "meta.json", "r+b") as handle:
        handle.truncate(10)
    notices, epoch, _ = _check_checkpoints(run_dir, run, spec)
    older = ckpt.local_checkpoints(run_dir)[1]
    assert notices == [f"checkpoint {newest.name} is corrupt ({resize.CONVERTED}/meta.json fails its SHA-256 check "
                       f"(truncated or corrupted)); resuming from {older.name} (epoch 0)"]
    assert epoch == 1 and resize.verify(older / resize.CONVERTED) is None


def test_a_changed_model_is_refused_naming_the_key_and_nothing_changes(matrix, prepared, tmp_path):
    from stoker.trainer.run import _check_checkpoints

    run_dir = _run_dir(matrix[0], tmp_path)
    before = sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    run, spec = _run(prepared, [64])
    with pytest.raises(UserError) as info:
        _check_checkpoints(run_dir, run, spec)
    message = str(info.value)
    assert message.startswith("model: run ") and "another model" in message and "\n" not in message
    assert "(0.bias is [37] in the checkpoint, [64] in the model, checkpoint checkpoint_b)" in message
    assert sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


def test_a_conversions_record_is_whole_stamped_and_checked(tmp_path):
    checkpoint = tmp_path / "checkpoint_0"
    checkpoint.mkdir()
    state = resize.Consolidated({"w": torch.arange(6.0).reshape(2, 3)}, {"w": {"exp_avg": torch.ones(2, 3)}},
                                {"step": torch.tensor(3.0)}, [{"lr": 0.1, "betas": [0.9, 0.99]}],
                                engine={"global_steps": 3}, source={"world_size": 2, "zero_stage": 2})
    converted = resize.write(state, checkpoint, ("run", 4))
    # No temporary left, beside the checkpoint or in it, and no second copy of the tensors.
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0"]
    assert [p.name for p in checkpoint.iterdir()] == [resize.CONVERTED]
    assert sorted(p.name for p in converted.iterdir()) == [ckpt.CONVERTED_SUMS, "meta.json"]
    meta = json.loads((converted / "meta.json").read_text())
    assert (meta["source"], meta["shapes"], meta["state_keys"]) == ({"world_size": 2, "zero_stage": 2}, {"w": [2, 3]},
                                                                    ["exp_avg"])
    # The checkpoint's identity: a record copied from another checkpoint is refused.
    assert resize.verify(converted, ("run", 4)) is None
    assert resize.verify(converted, ("run", 5)) == (f"{resize.CONVERTED}/ belongs to another checkpoint "
                                                   "(['run', 4], not ['run', 5])")
    (converted / "meta.json").write_text(json.dumps({}))
    assert resize.verify(converted) == f"{resize.CONVERTED}/meta.json fails its SHA-256 check (truncated or corrupted)"


@pytest.mark.parametrize(("saved", "now", "expected"), [
    ((2, 2), (1, 2), True), ((2, 2), (2, 2), False), ((2, 0), (3, 0), False), ((1, 1), (1, 3), True),
    ((1, 0), (1, 2), True),
])
def test_converts_only_when_deepspeed_cannot_load_it_as_it_is(saved, now, expected):
    assert resize.needs_conversion(saved, now) is expected
