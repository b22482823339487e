"""Turning any modality into a [B, T, D] sequence for the sequence models.

Text: token embeddings. Tabular [F]: F steps of one value. Images [C, H, W]: H steps (rows)
of C x W values.
"""

import torch
from torch import nn


class ToSequence(nn.Module):
    def __init__(self, spec, width: int) -> None:
        super().__init__()
        self.modality = spec.modality
        if spec.modality == "text":
            self.embed: nn.Module = nn.Embedding(spec.vocab_size, width)
            self.steps = spec.input_shape[0]
        else:
            shape = spec.input_shape
            step_width = 1 if len(shape) == 1 else shape[0] * shape[2]
            self.embed = nn.Linear(step_width, width)
            self.steps = shape[0] if len(shape) == 1 else shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality == "text":
            return self.embed(x)
        if x.dim() == 2:
            return self.embed(x.unsqueeze(-1))
        b, c, h, w = x.shape
        return self.embed(x.permute(0, 2, 1, 3).reshape(b, h, c * w))
