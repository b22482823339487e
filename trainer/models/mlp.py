"""Multi-layer perceptron for tabular rows (any input is flattened first)."""

from torch import nn


def build_mlp(config, spec) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()] if len(spec.input_shape) > 1 else []
    width = spec.in_features
    for hidden in config.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        width = hidden
    layers.append(nn.Linear(width, spec.out_features))
    return nn.Sequential(*layers)
