"""Regression targets, standardised for training.

The network learns (y - mean) / std, with the mean and standard deviation of the training
split's labels, so the output layer's scale does not depend on the label's units (a target in
the hundreds with an MLP initialised for unit outputs trains slowly, or diverges at a rate
that suits another dataset). Everything reported is in the label's own units: validation and
test metrics and losses are computed on de-standardised outputs, and the exported model
outputs original units. `train_loss` stays the objective the optimizer sees (standardised).
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stoker.datasets.manifest import LABEL_COLUMN, Manifest


@dataclass(frozen=True)
class TargetScale:
    mean: float
    std: float

    def standardise(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std

    def original(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs * self.std + self.mean


def training_target_scale(prepared: str, manifest: Manifest, s3=None) -> TargetScale | None:
    """The training split's label statistics for a regression dataset (None otherwise)."""
    if manifest.task != "regression":
        return None
    import pyarrow.parquet as pq

    from stoker.datasets.storage import arrow_filesystem, join, strip_scheme

    paths = [join(prepared, name) for name in manifest.splits["train"]["files"]]
    filesystem = arrow_filesystem(prepared, s3)
    if filesystem is not None:
        paths = [strip_scheme(p) for p in paths]
    labels = np.concatenate([
        pq.read_table(path, columns=[LABEL_COLUMN], filesystem=filesystem).column(0).to_numpy().astype(np.float64)
        for path in paths
    ])
    std = float(labels.std()) if len(labels) else 1.0
    return TargetScale(float(labels.mean()) if len(labels) else 0.0, std if std > 0 else 1.0)


class InOriginalUnits(nn.Module):
    """A regression network trained on standardised targets, answering in the label's units."""

    def __init__(self, network: nn.Module, scale: TargetScale) -> None:
        super().__init__()
        self.network, self.scale = network, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.original(self.network(x))
