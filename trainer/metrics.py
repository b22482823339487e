"""Evaluation metrics computed over the whole split across every rank.

torchmetrics keeps per-rank state (counts, or every prediction for ROC AUC); `compute()`
gathers every rank's states and merges them (torchmetrics' `merge_state`), so the result is the
metric of the full split, not an average of per-rank averages. `compute()` is a collective:
every rank must call it.

The states go in one `all_gather_object`, not through torchmetrics' own sync, which runs a
barrier and two all-gathers per state of every metric (about 50 collectives per validation of a
classifier): on digits with 2 CPU workers that took longer than the epoch's training pass.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from stoker.datasets.transform import PAD

if TYPE_CHECKING:
    import torchmetrics

# Metrics where smaller is better; every other metric is maximised.
MINIMIZE = {"loss", "mse", "mae", "perplexity"}


def default_metric(task: str) -> str:
    return {"classification": "accuracy", "language_modeling": "perplexity"}.get(task, "mse")


def metric_mode(metric: str) -> str:
    return "min" if metric in MINIMIZE else "max"


def metric_names(task: str) -> list[str]:
    if task == "classification":
        return ["loss", "accuracy", "precision", "recall", "f1", "roc_auc"]
    if task == "language_modeling":
        return ["loss", "perplexity"]
    return ["loss", "mse", "mae", "r2"]


def probabilities(outputs: torch.Tensor) -> torch.Tensor:
    """Class probabilities [B, C]; one output column is a binary (bce) logit."""
    outputs = outputs.float()
    if outputs.shape[-1] == 1:
        p = torch.sigmoid(outputs[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(outputs, dim=-1)


class Evaluation:
    """Scalar metrics (reported every validation) plus, on request, the per-class details and
    most confidently wrong examples that the report shows."""

    def __init__(self, task: str, num_classes: int | None, device: torch.device, worst_k: int = 20) -> None:
        # Imported here, not at the top: the driver uses this module's metric names only, and
        # torchmetrics (with the matplotlib and scipy.signal it imports) costs a second there.
        import torchmetrics
        from torchmetrics import classification as tmc
        from torchmetrics import regression as tmr
        from torchmetrics.text import Perplexity

        self.task, self.worst_k = task, worst_k
        own = {"sync_on_compute": False}  # `compute` merges every rank's states itself, at once
        details: dict[str, torchmetrics.Metric] = {}
        if task == "classification":
            assert num_classes is not None
            scalars: dict[str, torchmetrics.Metric] = {
                "accuracy": tmc.MulticlassAccuracy(num_classes, average="micro", **own),
                "precision": tmc.MulticlassPrecision(num_classes, average="macro", **own),
                "recall": tmc.MulticlassRecall(num_classes, average="macro", **own),
                "f1": tmc.MulticlassF1Score(num_classes, average="macro", **own),
                "roc_auc": tmc.MulticlassAUROC(num_classes, average="macro", **own),
            }
            details = {
                "precision_per_class": tmc.MulticlassPrecision(num_classes, average=None, **own),
                "recall_per_class": tmc.MulticlassRecall(num_classes, average=None, **own),
                "f1_per_class": tmc.MulticlassF1Score(num_classes, average=None, **own),
                "support_per_class": tmc.MulticlassStatScores(num_classes, average=None, **own),
                "confusion_matrix": tmc.MulticlassConfusionMatrix(num_classes, **own),
            }
        elif task == "language_modeling":
            scalars = {"perplexity": Perplexity(ignore_index=PAD, **own)}  # as the loss: padding is not text
        else:
            scalars = {"mse": tmr.MeanSquaredError(**own), "mae": tmr.MeanAbsoluteError(**own), "r2": tmr.R2Score(**own)}
        # No compute groups: each metric keeps its own state, so merging a rank's states into
        # one metric never touches another's.
        self.scalars = torchmetrics.MetricCollection(scalars, compute_groups=False).to(device)
        self.details = torchmetrics.MetricCollection(details, compute_groups=False).to(device) if details else None
        self.with_details = False
        self.worst: list[tuple[float, int, int, list[float]]] = []
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)

    def reset(self, with_details: bool = False) -> None:
        self.scalars.reset()
        if self.details is not None:
            self.details.reset()
        self.with_details, self.worst = with_details, []
        self.loss.zero_()

    def update(self, outputs: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, inputs: torch.Tensor) -> None:
        rows = target.shape[0]
        self.loss += torch.stack([loss.double() * rows, torch.tensor(rows, dtype=torch.float64, device=loss.device)])
        if self.task == "language_modeling":
            self.scalars.update(outputs[:, :-1].float(), target[:, 1:])
            return
        if self.task != "classification":
            self.scalars.update(outputs.float().reshape(-1), target.float())
            return
        probs = probabilities(outputs)
        self.scalars.update(probs, target)
        if self.with_details and self.details is not None:
            self.details.update(probs, target)
            self._keep_worst(probs, target, inputs)

    def _keep_worst(self, probs: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> None:
        confidence, predicted = probs.max(dim=1)
        wrong = (predicted != target).nonzero().flatten().tolist()
        for i in wrong:
            row = inputs[i].flatten()[:16].float().tolist()  # a preview, not the whole image
            item = (float(confidence[i]), int(predicted[i]), int(target[i]), row)
            if len(self.worst) < self.worst_k:
                heapq.heappush(self.worst, item)
            else:
                heapq.heappushpop(self.worst, item)

    def compute(self) -> tuple[dict[str, float], dict[str, Any]]:
        """(scalar metrics incl. loss, details). A collective: every rank must call it."""
        collections = {"scalars": self.scalars}
        if self.with_details and self.details is not None:
            collections["details"] = self.details
        worst = self._merge_ranks(collections)
        results = {k: float(v) for k, v in self.scalars.compute().items()}
        results["loss"] = float(self.loss[0] / self.loss[1]) if self.loss[1] else float("nan")
        details: dict[str, Any] = {}
        if "details" in collections:
            computed = self.details.compute()
            for key, value in computed.items():
                if key == "support_per_class":
                    details[key] = value[:, 4].tolist()  # stat scores: tp, fp, tn, fn, support
                else:
                    details[key] = value.tolist()
            top = heapq.nlargest(self.worst_k, worst)
            details["worst_examples"] = [{"confidence": c, "predicted": p, "true": t, "inputs": row} for c, p, t, row in top]
        return results, details

    def _merge_ranks(self, collections: dict[str, Any]) -> list[tuple[float, int, int, list[float]]]:
        """Merge every other rank's metric states, loss sums and worst examples into this
        rank's, in one collective; returns the worst examples of every rank."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return list(self.worst)
        # NumPy arrays, not tensors, on the wire: a classifier's 39 state tensors took 13 ms to
        # pickle and unpickle as tensors and 0.6 ms as arrays, on each rank at every evaluation.
        mine = {
            "states": {group: {name: _portable(metric.metric_state) for name, metric in metrics.items()}
                       for group, metrics in collections.items()},
            "loss": _portable({"loss": self.loss})["loss"],
            "worst": list(self.worst),
        }
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)  # sync
        worst = []
        for rank, theirs in enumerate(everyone):
            worst += theirs["worst"]
            if rank == dist.get_rank():
                continue
            self.loss += _to({"loss": theirs["loss"]}, self.loss.device)["loss"]
            for group, metrics in collections.items():
                for name, metric in metrics.items():
                    metric.merge_state(_to(theirs["states"][group][name], self.loss.device))
        return worst


def _to(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A metric state (tensors or NumPy arrays, or lists of them) as tensors on `device`."""
    return {k: [_tensor(t, device) for t in v] if isinstance(v, list) else _tensor(v, device) for k, v in state.items()}


def _tensor(value: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(value).to(device) if isinstance(value, np.ndarray) else value.to(device)


def _portable(state: dict[str, Any]) -> dict[str, Any]:
    """A metric state with its tensors as NumPy arrays (on the CPU) where NumPy has their dtype
    (bfloat16 stays a tensor), for `all_gather_object`."""

    def one(t: torch.Tensor) -> torch.Tensor | np.ndarray:
        t = t.detach().cpu()
        return t if t.dtype == torch.bfloat16 else t.numpy()

    return {k: [one(t) for t in v] if isinstance(v, list) else one(v) for k, v in state.items()}
