"""Every row of an evaluation split in exactly one rank's share, equal batch counts per rank."""

import pytest
import torch

from stoker.trainer.eval_rows import EvalRows


def shares(rows: int, world: int, batch: int):
    data = torch.arange(rows, dtype=torch.float32).reshape(-1, 1)
    out = []
    for rank in range(world):
        part = EvalRows(([], None), ["x"], rows, rank, world, torch.float32)
        # What `_load` keeps from the streamed split: the rank's contiguous share.
        part._x, part._y = data[part.begin:part.end], data[part.begin:part.end, 0]
        part._pad = (data[:1], data[:1, 0])
        out.append(list(part.batches(batch, torch.device("cpu"))))
    return out


@pytest.mark.parametrize(("rows", "world", "batch"), [(27, 2, 32), (27, 2, 4), (28, 3, 5), (3, 3, 8), (181, 3, 16)])
def test_every_row_counted_once_with_equal_batches(rows, world, batch):
    parts = shares(rows, world, batch)
    assert len({len(p) for p in parts}) == 1, "every rank must run the same number of forwards"
    seen = [int(v) for p in parts for x, _, valid in p for v in x[:valid, 0]]
    assert sorted(seen) == list(range(rows))
