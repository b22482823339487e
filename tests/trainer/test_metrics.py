"""Metrics over the whole split across ranks: two real gloo processes, checked with sklearn."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn import metrics as skm

from stoker.trainer.metrics import Evaluation, default_metric, metric_mode

N, C = 203, 4


def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(N, C)).astype(np.float32)
    target = rng.integers(0, C, size=N)
    target[:40] = logits[:40].argmax(1)  # some signal
    return torch.from_numpy(logits), torch.from_numpy(target)


def _worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits, target = data()
    # Uneven shards (rank 0 gets far more rows): an average of per-rank averages would be wrong.
    cut = 150
    part = slice(0, cut) if rank == 0 else slice(cut, N)
    ev = Evaluation("classification", C, torch.device("cpu"), worst_k=5)
    ev.reset(with_details=True)
    for start in range(part.start, part.stop, 32):
        s = slice(start, min(start + 32, part.stop))
        ev.update(logits[s], target[s], torch.nn.functional.cross_entropy(logits[s], target[s]), logits[s])
    scalars, details = ev.compute()
    queue.put((rank, scalars, details))
    dist.destroy_process_group()


def test_classification_metrics_equal_sklearn_on_the_whole_split():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (a, b)) for r, a, b in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    logits, target = data()
    probs = torch.softmax(logits, 1).numpy()
    pred = probs.argmax(1)
    y = target.numpy()
    for rank in (0, 1):
        scalars, details = results[rank]
        assert scalars["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
        assert scalars["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-5)
        assert scalars["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"), abs=1e-5)
        assert scalars["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"), abs=1e-4)
        assert scalars["loss"] == pytest.approx(skm.log_loss(y, probs), abs=1e-4)
        assert details["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
        assert details["recall_per_class"] == pytest.approx(skm.recall_score(y, pred, average=None), abs=1e-5)
        assert details["support_per_class"] == np.bincount(y, minlength=C).tolist()
    worst = results[0][1]["worst_examples"]
    wrong = pred != y
    top = np.sort(probs.max(1)[wrong])[::-1][:5]
    assert [w["confidence"] for w in worst] == pytest.approx(top.tolist(), abs=1e-6)
    assert all(w["predicted"] != w["true"] for w in worst)


def test_regression_and_language_model_metrics():
    ev = Evaluation("regression", None, torch.device("cpu"))
    ev.reset()
    out, y = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 3.0, 3.0])
    ev.update(out, y, torch.tensor(0.0), out)
    scalars, _ = ev.compute()
    assert scalars["mse"] == pytest.approx(2 / 3) and scalars["mae"] == pytest.approx(2 / 3)
    assert scalars["r2"] == pytest.approx(skm.r2_score(y.numpy(), out.flatten().numpy()), abs=1e-5)

    lm = Evaluation("language_modeling", None, torch.device("cpu"))
    lm.reset()
    tokens = torch.randint(0, 7, (2, 6))
    logits = torch.zeros(2, 6, 7)  # uniform: perplexity equals the vocabulary size
    lm.update(logits, tokens, torch.tensor(np.log(7.0)), tokens)
    assert lm.compute()[0]["perplexity"] == pytest.approx(7.0, rel=1e-5)
    assert default_metric("language_modeling") == "perplexity" and metric_mode("perplexity") == "min"
