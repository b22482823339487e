"""Evaluation metrics computed over the whole split across every rank.

torchmetrics keeps per-rank state (counts, or every prediction for ROC AUC) and all-gathers it
on `compute()`, so the result is the metric of the full split, not an average of per-rank
averages. `compute()` is a collective: every rank must call it.
"""

import torch
import torchmetrics
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

# Metrics where smaller is better; every other metric is maximised.
MINIMIZE = {"loss", "mse", "mae"}


def default_metric(task: str) -> str:
    return "accuracy" if task == "classification" else "mse"


def metric_mode(metric: str) -> str:
    return "min" if metric in MINIMIZE else "max"


def metric_names(task: str) -> list[str]:
    if task == "classification":
        return ["loss", "accuracy", "precision", "recall", "f1", "roc_auc"]
    return ["loss", "mse", "mae", "r2"]


def build_metrics(task: str, num_classes: int | None, device: torch.device) -> torchmetrics.MetricCollection:
    if task == "classification":
        assert num_classes is not None
        metrics = {
            "accuracy": tmc.MulticlassAccuracy(num_classes, average="micro"),
            "precision": tmc.MulticlassPrecision(num_classes, average="macro"),
            "recall": tmc.MulticlassRecall(num_classes, average="macro"),
            "f1": tmc.MulticlassF1Score(num_classes, average="macro"),
            "roc_auc": tmc.MulticlassAUROC(num_classes, average="macro"),
        }
    else:
        metrics = {"mse": tmr.MeanSquaredError(), "mae": tmr.MeanAbsoluteError(), "r2": tmr.R2Score()}
    return torchmetrics.MetricCollection(metrics).to(device)


def update(metrics: torchmetrics.MetricCollection, task: str, outputs: torch.Tensor, target: torch.Tensor) -> None:
    outputs = outputs.float()
    if task == "classification":
        metrics.update(torch.softmax(outputs, dim=-1), target)
    else:
        metrics.update(outputs.squeeze(-1), target)
