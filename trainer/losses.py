"""Training losses and explicit L1/L2 penalties, built from `train.loss` and the manifest.

Every loss takes the model's raw outputs and the batch's targets and returns a float32
scalar; language modelling shifts the tokens (position t predicts token t + 1).
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from stoker.datasets.transform import PAD
from stoker.errors import UserError
from stoker.trainer.config import LossConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_FOR_TASK = {
    "classification": ("cross_entropy", "bce"),
    "regression": ("mse", "huber"),
    "language_modeling": ("cross_entropy",),
}


def resolve_name(config: LossConfig, task: str) -> str:
    if config.name == "auto":
        return "mse" if task == "regression" else "cross_entropy"
    if config.name not in _FOR_TASK.get(task, ()):
        raise UserError(
            f"train.loss.name: {config.name} does not fit task {task}; "
            f"use {' or '.join(_FOR_TASK.get(task, ('auto',)))}"
        )
    return config.name


def class_weights(config: LossConfig, classes: list, train_counts: dict[str, int] | None) -> list[float] | None:
    """Per-class weights in the manifest's class order, or None for unweighted."""
    if config.class_weights == "none":
        return None
    if isinstance(config.class_weights, list):
        if len(config.class_weights) != len(classes):
            raise UserError(
                f"train.loss.class_weights: {len(config.class_weights)} weights for "
                f"{len(classes)} classes ({', '.join(map(str, classes))})"
            )
        return [float(w) for w in config.class_weights]
    if not train_counts:
        raise UserError("train.loss.class_weights: balanced needs the manifest's training class counts")
    counts = [int(train_counts.get(str(c), 0)) for c in classes]
    total = sum(counts)
    # sklearn's "balanced" heuristic: n_rows / (n_classes * rows of the class).
    return [total / (len(counts) * n) if n else 0.0 for n in counts]


def build_loss(config: LossConfig, task: str, weights: list[float] | None, device=None) -> LossFn:
    name = resolve_name(config, task)
    weight = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    if name == "cross_entropy":
        ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
        if task == "language_modeling":
            # Padding is not text: predicting pad after pad is free and would flatter the loss.
            # A sum over the real targets divided by their count (at least 1), not a mean with
            # ignore_index, which is NaN for a batch of one-token rows (no target at all).
            smoothing = config.label_smoothing

            def lm(outputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
                logits = outputs[:, :-1].float()
                targets = tokens[:, 1:].reshape(-1)
                total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=PAD,
                                        reduction="sum", label_smoothing=smoothing)
                return total / (targets != PAD).sum().clamp(min=1)
            return lm
        return lambda outputs, target: ce(outputs.float(), target)
    if name == "bce":
        def bce(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits = outputs.float().reshape(-1)
            per_row = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
            if weight is None:
                return per_row.mean()
            # Same normalisation as weighted cross-entropy: a weighted mean, not a weighted sum.
            w = weight[target.long()]
            return (per_row * w).sum() / w.sum()
        return bce
    if name == "huber":
        return lambda outputs, target: F.huber_loss(outputs.float().reshape(-1), target.float(), delta=config.huber_delta)
    return lambda outputs, target: F.mse_loss(outputs.float().reshape(-1), target.float())


def penalty(config: LossConfig, parameters: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """l1 * sum|w| + l2 * sum w^2 over weight matrices (biases and norm scales are exempt,
    as in the usual weight-decay convention); None when both coefficients are zero."""
    if not (config.l1 or config.l2):
        return None
    total = None
    for p in parameters:
        if p.dim() < 2:
            continue
        w = p.float()
        term = config.l1 * w.abs().sum() + config.l2 * w.pow(2).sum()
        total = term if total is None else total + term
    return total
