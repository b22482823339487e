"""Reading prepared splits through Ray Data: tensor shapes per modality, re-sampling, S3 e2e."""

import numpy as np
import pandas as pd
import pytest
import ray.data
import torch
from PIL import Image

from stoker.config import parse_config
from stoker.datasets.config import DataConfig
from stoker.datasets.ingest import ingest_kwargs, iter_split, read_split
from stoker.datasets.manifest import Manifest
from stoker.datasets.prepare import prepare
from tests.conftest import best_epoch_of, run_config


def batches(output, split, features, **kwargs):
    manifest = Manifest.read(output)
    dataset = read_split(output, split, 0.5, **kwargs)
    extra = ingest_kwargs(None, manifest)
    return list(iter_split(dataset.iterator(), features, 16, torch.device("cpu"), torch.float32, **extra))


def test_image_text_and_tabular_batches_have_the_agreed_shapes(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "img" / name / f"{i}.png")
    images = prepare(DataConfig(source=str(tmp_path / "img"), output=str(tmp_path / "pi"), image={"size": [6, 5]}))
    got = batches(tmp_path / "pi", "train", ["features"])
    # Ray collates in prefetch threads, so the short last batch may arrive first.
    assert sorted(len(y) for _, y in got) == [12, 16] == sorted([images.splits["train"]["rows"] - 16, 16])
    for x, y in got:
        assert x.shape == (len(y), 3, 6, 5) and x.dtype == torch.float32 and y.dtype == torch.int64

    pd.DataFrame({"text": [f"word{i % 7} and more words {i}" for i in range(90)], "target": [0, 1, 2] * 30}) \
        .to_csv(tmp_path / "t.csv", index=False)
    prepare(DataConfig(source=str(tmp_path / "t.csv"), label="target", output=str(tmp_path / "pt"), text={"max_length": 5}))
    got = batches(tmp_path / "pt", "train", ["features"])
    assert max(len(y) for _, y in got) == 16
    for x, y in got:
        assert x.shape == (len(y), 5) and x.dtype == torch.int64 and (x > 0).all() and y.shape == (len(y),)

    pd.DataFrame({"u": np.arange(90.0), "v": np.arange(90.0) * 2, "target": [0, 1, 2] * 30}).to_csv(tmp_path / "n.csv", index=False)
    manifest = prepare(DataConfig(source=str(tmp_path / "n.csv"), label="target", output=str(tmp_path / "pn")))
    got = batches(tmp_path / "pn", "train", manifest.features)
    assert max(len(x) for x, _ in got) == 16 and all(x.shape[1:] == (2,) for x, _ in got)
    assert sum(len(y) for _, y in got) == manifest.splits["train"]["rows"]


def test_balance_resampling_evens_out_classes_each_epoch(ray_cluster, tmp_path):
    pd.DataFrame({"u": np.arange(1100.0), "target": ["big"] * 1000 + ["small"] * 100}).to_csv(tmp_path / "n.csv", index=False)
    manifest = prepare(DataConfig(source=str(tmp_path / "n.csv"), label="target", output=str(tmp_path / "p")))
    dataset = read_split(tmp_path / "p", "train", 0.5, ingest={"resample": "balance"})
    epochs = [np.concatenate([b["label"] for b in dataset.iter_batches(batch_size=256)]) for _ in range(2)]
    train_rows = manifest.splits["train"]["rows"]
    for labels in epochs:
        assert abs(len(labels) - train_rows) < 0.1 * train_rows
        assert 0.4 < (labels == 1).mean() < 0.6  # small class: 9% of the data, half of the samples
    rows = [np.concatenate([b["u"] for b in dataset.iter_batches(batch_size=256)]) for _ in range(2)]
    assert not np.array_equal(np.sort(rows[0]), np.sort(rows[1]))  # a fresh draw every epoch


@pytest.mark.slow
def test_prepare_to_s3_and_read_the_shards_back_with_the_endpoint_from_the_environment(ray_cluster, bucket, digits_csv,
                                                                                      tmp_path, monkeypatch):
    """No `data.s3` section: the endpoint comes from the AWS environment, for the preparation
    and for the trainer's reads. (Training from S3 end to end, with the config's `data.s3`, is
    tests/cluster/test_s3_verbs.py's.)"""
    endpoint, name, client = bucket
    client.put_object(Bucket=name, Key="raw/digits.csv", Body=digits_csv.read_bytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    output = f"s3://{name}/prepared/digits"
    config = run_config(f"s3://{name}/raw/digits.csv", output, tmp_path / "runs")
    config["data"]["rows_per_shard"] = 400
    manifest = prepare(parse_config(config, "test").data)
    assert manifest.splits["train"]["files"] == [f"train/part-0000{i}.parquet" for i in range(4)]
    got = batches(output, "train", manifest.features)
    labels = np.concatenate([y.numpy() for _, y in got])
    assert len(labels) == manifest.splits["train"]["rows"] and set(labels.tolist()) == set(range(10))


def test_window_emits_every_row_once_in_full_batches_seeded():
    from stoker.datasets.ingest import _Window

    def run(seed, blocks):
        window, out = _Window(), []
        rng = np.random.default_rng(seed) if seed is not None else None
        for block in blocks:
            window.add(block, block * 10)
            if window.rows >= 40:
                out += list(window.drain(16, rng, keep_tail=True))
        out += list(window.drain(16, rng, keep_tail=False))
        return out

    blocks = [np.arange(0, 25), np.arange(25, 30), np.arange(30, 100)]
    got = run(7, blocks)
    assert [len(x) for x, _ in got] == [16] * 6 + [4]  # only the epoch's last batch is short
    rows = np.concatenate([x for x, _ in got])
    assert sorted(rows.tolist()) == list(range(100))
    assert all(np.array_equal(y, x * 10) for x, y in got)  # labels stay with their rows
    assert not np.array_equal(rows, np.arange(100))
    assert np.array_equal(rows, np.concatenate([x for x, _ in run(7, blocks)]))  # same seed, same order
    assert not np.array_equal(rows, np.concatenate([x for x, _ in run(8, blocks)]))
    assert np.array_equal(np.concatenate([x for x, _ in run(None, blocks)]), np.arange(100))


def test_wait_clock_stops_at_the_end_of_the_pass():
    import time

    from stoker.datasets.ingest import WaitClock

    def slow():
        time.sleep(0.05)
        yield 1

    clock = WaitClock()
    assert list(clock.iterate(slow())) == [1]
    time.sleep(0.2)  # after the pass (validation, checkpoints): not part of the fraction
    assert 0.05 <= clock.wait_s and clock.elapsed() < 0.15 and clock.fraction() > 0.3


def test_a_finished_training_pass_starts_the_next_one_ahead(ray_cluster):
    from stoker.datasets import ingest

    dataset = ray.data.from_items([{"u": float(i), "label": i % 3} for i in range(300)], override_num_blocks=3)
    shard = dataset.iterator()
    ingest.start_split(shard, ["u"], prefetch_batches=4)  # before a loop's slow set-up
    assert shard in ingest._AHEAD
    passes = []
    for epoch in range(2):
        got = list(iter_split(shard, ["u"], 32, torch.device("cpu"), torch.float32, epoch))
        passes.append(np.sort(np.concatenate([x[:, 0].numpy() for x, _ in got])))
        assert [len(x) for x, _ in got] == [32] * 9 + [12]
        assert shard in ingest._AHEAD  # the next pass is already running
    assert all(np.array_equal(p, np.arange(300.0)) for p in passes)
    # An unshuffled pass (evaluation) uses the pass already started, and starts none.
    got = list(iter_split(shard, ["u"], 32, torch.device("cpu"), torch.float32, None))
    assert sum(len(x) for x, _ in got) == 300 and shard not in ingest._AHEAD
    list(iter_split(shard, ["u"], 32, torch.device("cpu"), torch.float32, 5))
    later = dataset.iterator()  # the next run in this process: the old run's pass is stopped
    ingest.start_split(later, ["u"])
    assert shard not in ingest._AHEAD and later in ingest._AHEAD
    ingest._take_ahead(later, (("u",), None)).close()


def test_auto_materialises_only_splits_that_fit_a_quarter_of_the_object_store(ray_cluster):
    from stoker.datasets.config import IngestConfig
    from stoker.datasets.ingest import _should_materialize

    store = ray.cluster_resources()["object_store_memory"]
    roomy = IngestConfig(materialize_max_mb=store / 2**20)
    fits, too_big = {"bytes": int(store * 0.2)}, {"bytes": int(store * 0.3)}
    assert _should_materialize(roomy, fits, "train", 3, True)
    # What is read once, or the small evaluation splits, streams when reads can run alongside
    # training; when they cannot, every split that fits is cached before training.
    assert not _should_materialize(roomy, fits, "train", 1, True)
    assert not _should_materialize(roomy, fits, "validation", 3, True)
    assert _should_materialize(roomy, fits, "validation", 1, False)
    assert not _should_materialize(roomy, too_big, "train", 3, True)
    assert not _should_materialize(IngestConfig(materialize_max_mb=1), {"bytes": 2 * 2**20}, "train", 3, True)
    assert _should_materialize(IngestConfig(materialize="always"), {"bytes": int(store * 0.9)}, "test", 1, True)


def test_a_split_that_would_stream_with_no_cpu_for_its_reads_is_refused(prepared):
    from stoker.errors import UserError

    with pytest.raises(UserError, match=r"^data.ingest: the validation split would be read during training "
                                        r"\(data.ingest.materialize is never\).*raise scaling.data_cpus"):
        read_split(prepared["data"]["output"], "validation", 0.5, ingest={"materialize": "never"}, can_stream=False)


def _feed(prepared, seed, epochs, first_epoch=0, **ingest):
    """Each epoch's rows (column `u`) per rank, block by block, as Ray Train hands them over:
    a copy of the dataset with `preserve_order`, split equally across 2 ranks read together."""
    import threading

    from ray.data import ExecutionOptions

    dataset = read_split(prepared, "train", 0.5, ingest=ingest, seed=seed, first_epoch=first_epoch)
    dataset = dataset.copy(dataset)
    dataset.context.execution_options = ExecutionOptions(preserve_order=True)
    shards = dataset.streaming_split(2, equal=True)
    passes = []
    for _ in range(epochs):
        got = [None, None]

        def read(rank, got):
            got[rank] = [block["u"].tolist() for block in shards[rank].iter_batches(batch_size=None)]

        threads = [threading.Thread(target=read, args=(rank, got)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        passes.append(got)
    return passes


@pytest.fixture
def many_blocks(monkeypatch):
    """A split of several blocks, in miniature: Ray Data cuts blocks at this many bytes."""
    monkeypatch.setattr(ray.data.DataContext.get_current(), "target_max_block_size", 2048)


def test_same_seed_feeds_the_same_rows_in_the_same_order_and_epochs_differ(ray_cluster, tmp_path, many_blocks):
    pd.DataFrame({"u": np.arange(1200.0), "target": ["a"] * 1000 + ["b"] * 200}).to_csv(tmp_path / "n.csv", index=False)
    manifest = prepare(DataConfig(source=str(tmp_path / "n.csv"), label="target", output=str(tmp_path / "p"),
                                  rows_per_shard=100, scale="none"))
    assert len(manifest.splits["train"]["files"]) > 4
    train_rows = sorted(np.concatenate([b["u"] for b in read_split(tmp_path / "p", "train", 0.5).iter_batches()]).tolist())
    # A materialised split shuffles its blocks per epoch; a streamed one its files.
    for materialize in ("always", "never"):
        ingest = {"materialize": materialize}
        first, again, other = (_feed(tmp_path / "p", seed, 2, **ingest) for seed in (1, 1, 2))
        assert all(len(blocks) > 1 for rank in first for blocks in rank), ingest  # several blocks per rank
        assert first == again, ingest  # same seed: same rows, same order, same rank
        assert first[0] != first[1] and first != other, ingest  # another epoch or seed: another order
        for epoch in first:  # the ranks' shards together are the split, each row once
            assert sorted(sum(epoch[0] + epoch[1], [])) == train_rows
        # A run resumed at epoch 1 sees what an uninterrupted run saw in its epoch 1.
        assert _feed(tmp_path / "p", 1, 1, first_epoch=1, **ingest) == first[1:], ingest

    balanced, balanced_again = (_feed(tmp_path / "p", 3, 2, materialize="always", resample="balance") for _ in range(2))
    assert balanced == balanced_again  # the same draws
    rows = [sorted(sum(epoch[0] + epoch[1], [])) for epoch in balanced]
    assert rows[0] != rows[1]  # a fresh draw every epoch
    for drawn in rows:
        assert 0.35 < np.mean(np.asarray(drawn) >= 1000) < 0.65  # the minority class: half the rows


def test_balance_draws_depend_on_seed_epoch_and_row_not_on_blocks():
    import pyarrow as pa
    from ray.data import DataContext

    from stoker.datasets.ingest import _Balance

    table = pa.table({"u": np.arange(400.0), "label": np.r_[np.zeros(300, int), np.ones(100, int)],
                      "row_hash": np.arange(400, dtype=np.uint64) * 7919})
    context = DataContext.get_current()
    old = context._execution_idx

    def draw(seed, epoch, cuts=(0, 400)):
        context._execution_idx = epoch
        balance = _Balance({"a": 300, "b": 100}, seed)
        parts = [balance(table.slice(a, b - a)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        assert all("row_hash" not in part.column_names for part in parts)
        return np.concatenate([part["u"].to_numpy() for part in parts])

    try:
        whole = draw(0, 5)
        assert np.array_equal(whole, draw(0, 5, cuts=(0, 37, 250, 400)))  # however Ray cut the blocks
        assert not np.array_equal(whole, draw(0, 6)) and not np.array_equal(whole, draw(1, 5))
        counts = np.bincount(np.concatenate([draw(0, e) for e in range(20)]).astype(int) // 300, minlength=2)
        assert 0.45 < counts[1] / counts.sum() < 0.55 and 0.9 < counts.sum() / (20 * 400) < 1.1
    finally:
        context._execution_idx = old


@pytest.mark.slow
def test_a_training_resumed_from_an_earlier_epoch_logs_the_same_metrics_bit_for_bit(ray_cluster, digits_csv, tmp_path,
                                                                                    monkeypatch, capsys):
    """Two uninterrupted runs of one config agree too (tests/cluster/test_multinode.py compares a
    run on two nodes with one on one node to 1e-6); here the second run is the costlier case: a
    resume, which must feed epoch 1 its own order and re-sampling, not a first pass's.

    The resume is from a corrupt latest checkpoint, so this one training is also the trainer's
    corrupt-checkpoint test: the run falls back to the previous checkpoint and says so, and with
    every checkpoint corrupt it stops in one line."""
    import json

    from stoker.errors import UserError
    from stoker.trainer import checkpoints as ckpt
    from stoker.trainer.run import train

    # Several shard files and blocks (a split bigger than one block, in miniature), per-epoch
    # block order and class re-sampling: every random choice of the feed is in play.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "target_max_block_size", 64 * 1024)
    config = run_config(digits_csv, tmp_path / "prepared", tmp_path / "runs",
                        train={"epochs": 2, "batch_size": 32, "seed": 7, "optimizer": {"name": "adamw", "lr": 0.003},
                               "deepspeed": {"zero_stage": 2}})
    config["data"].update(rows_per_shard=300, ingest={"resample": "balance"})
    prepare(parse_config(config, "test").data)
    unlike = {"epoch_time_s", "validation_s", "samples_per_s", "data_wait_fraction", "first_batch_s", "checkpoint",
              "checkpoint_s", "time_wait_s", "time_compute_s", "time_step_s", "time_other_s"}

    def logged(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in unlike} for line in lines]

    run = parse_config(dict(config, name="first"), "test")
    run_dir = train(run).run_dir
    first = logged(run_dir)
    assert [r["epoch"] for r in first] == [0, 1]
    assert first[0]["train_loss"] != first[1]["train_loss"]

    # Epoch 1's checkpoint corrupted: the run restarts from epoch 0's and trains epoch 1 again.
    newest = ckpt.local_checkpoints(run_dir)[0]
    assert ckpt.epoch_of(newest) == 1
    shard = next(newest.rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    capsys.readouterr()
    result = train(run)
    err = capsys.readouterr().err
    assert f"checkpoint {newest.name} is corrupt ({shard.relative_to(newest)} fails its SHA-256 check" in err
    assert "(epoch 0)" in err
    # Epoch 1 trained again from epoch 0's checkpoint, listed once, the same bit for bit.
    assert logged(run_dir) == first  # bit for bit: losses, validation metrics, optimizer steps
    assert result.best_epoch == best_epoch_of(logged(run_dir))

    for path in ckpt.local_checkpoints(run_dir):
        victim = next(path.rglob("*model_states.pt"))
        victim.write_bytes(b"")
    with pytest.raises(UserError, match="checkpoint is corrupt .* and no earlier checkpoint is intact; rerun with --fresh"):
        train(run)


def test_a_small_split_is_read_by_the_caller_with_the_rows_ray_data_would_read(ray_cluster, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from stoker.datasets import ingest

    pd.DataFrame({"u": np.arange(1200.0), "target": ["a"] * 1000 + ["b"] * 200}).to_csv(tmp_path / "n.csv", index=False)
    manifest = prepare(DataConfig(source=str(tmp_path / "n.csv"), label="target", output=str(tmp_path / "p"),
                                  rows_per_shard=100, scale="none"))
    files = manifest.splits["train"]["files"]
    in_file_order = np.concatenate([pq.read_table(tmp_path / "p" / name)["u"].to_numpy() for name in files]).tolist()
    assert manifest.splits["train"]["bytes"] <= ingest.LOCAL_READ_MAX_BYTES and len(files) > 4
    read_here = ingest.cache_split(tmp_path / "p", "train", 0.5, ingest={"materialize": "always"})
    assert read_here.num_blocks() == len(files)  # one block per file, put by this process
    monkeypatch.setattr(ingest, "LOCAL_READ_MAX_BYTES", 0)  # too large: Ray Data's read tasks
    read_by_tasks = ingest.cache_split(tmp_path / "p", "train", 0.5, ingest={"materialize": "always"})
    for dataset in (read_here, read_by_tasks):
        assert np.concatenate([b["u"] for b in dataset.iter_batches(batch_size=None)]).tolist() == in_file_order
        assert dataset.schema().names == read_by_tasks.schema().names


def test_a_streamed_split_moves_in_small_blocks_and_lists_its_files_once(ray_cluster, tmp_path, monkeypatch):
    """Issue #13: a split streamed every epoch must not come in Ray's default blocks (up to 128
    MiB: a store smaller than the split spills them) nor list its files in every execution
    (Ray 2.60's V2 Parquet reader runs a `ListFiles` task per epoch: seconds before the first
    block)."""
    from stoker.datasets import ingest

    rows = 40_000
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({f"f{i}": rng.normal(size=rows) for i in range(24)})
    frame["target"] = np.arange(rows) % 3
    frame.to_csv(tmp_path / "n.csv", index=False)
    manifest = prepare(DataConfig(source=str(tmp_path / "n.csv"), label="target", output=str(tmp_path / "p")))
    assert len(manifest.splits["train"]["files"]) == 1
    # The smallest block the rule allows (1 MiB), so a split of a few MiB shows it.
    monkeypatch.setattr(ingest, "STREAM_BLOCK_STORE_SHARE", 1e-12)
    assert ingest.stream_block_bytes() == ingest.MIN_STREAM_BLOCK_BYTES
    context = ray.data.DataContext.get_current()
    before = (context.target_max_block_size, context.use_datasource_v2)
    dataset = read_split(tmp_path / "p", "train", 0.5, ingest={"materialize": "never"})
    assert (context.target_max_block_size, context.use_datasource_v2) == before  # set for the read only
    for _ in range(2):  # two epochs: each a new execution
        sizes = [m.size_bytes for bundle in dataset.iter_internal_ref_bundles() for m in bundle.metadata]
        assert sum(m for m in sizes) > 2 * ingest.MIN_STREAM_BLOCK_BYTES
        assert len(sizes) >= 2 and max(sizes) <= 1.25 * ingest.MIN_STREAM_BLOCK_BYTES, sizes
        assert "ListFiles" not in dataset.stats()
    # A materialised split is read once: Ray's own reader and block size.
    cached = read_split(tmp_path / "p", "train", 0.5, ingest={"materialize": "always"})
    assert len([m for bundle in cached.iter_internal_ref_bundles() for m in bundle.metadata]) == 1


def test_the_feed_holds_no_view_of_rays_shared_memory(ray_cluster):
    """A label column (or a list column reshaped) handed over by Ray is a read-only view of the
    block in the object store: held in the feed's queue or the shuffle window it would keep the
    whole block (every feature column) pinned there, beyond what the executor budgets."""
    from stoker.datasets.ingest import _BlockFeed

    dataset = ray.data.from_items([{"u": float(i), "label": i % 3} for i in range(3000)], override_num_blocks=3)
    feed = _BlockFeed(dataset.iterator(), ["u"], None, depth=2)
    blocks = list(feed)
    assert sum(len(x) for x, _ in blocks) == 3000
    assert all(x.flags.writeable and y.flags.writeable for x, y in blocks)
