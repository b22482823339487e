"""What the models are. How they are distributed (DeepSpeed, ZeRO) lives in engine.py."""

from collections.abc import Callable

from torch import nn

from stoker.trainer.config import ModelConfig


def build_mlp(config: ModelConfig, in_features: int, out_features: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for hidden in config.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


# name -> builder(config, input width, output width); the config's `model.name` picks one.
MODELS: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {"mlp": build_mlp}


def build_model(config: ModelConfig, in_features: int, out_features: int) -> nn.Module:
    return MODELS[config.name](config, in_features, out_features)
