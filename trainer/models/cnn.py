"""A small convolutional network for images [C, H, W]."""

from torch import nn

from stoker.errors import UserError


def build_cnn(config, spec) -> nn.Module:
    if spec.modality != "image" or len(spec.input_shape) != 3:
        raise UserError(
            f"model.name: cnn needs image data ([C, H, W]); the dataset is {spec.modality} "
            f"with input shape {list(spec.input_shape)}"
        )
    layers: list[nn.Module] = []
    channels, size = spec.input_shape[0], min(spec.input_shape[1:])
    for out in config.channels:
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        if size >= 2:  # pool while the feature map is still big enough to halve
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if config.dropout > 0:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(channels, spec.out_features))
    return nn.Sequential(*layers)
