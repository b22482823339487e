"""What the models are: a registry of built-in architectures and user models by import path.

How a model is distributed (DeepSpeed, ZeRO) lives in deepspeed_config.py, deepspeed_engine.py and loop.py; nothing here
knows about ranks. Every builder takes `(config, spec)` and returns a plain `nn.Module`.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod

import torch
from torch import nn

from stoker.errors import UserError
from stoker.trainer.config import ModelConfig
from stoker.trainer.models.cnn import build_cnn
from stoker.trainer.models.mlp import build_mlp
from stoker.trainer.models.rnn import build_gru, build_lstm
from stoker.trainer.models.transformer import build_gpt, build_transformer


@dataclass(frozen=True)
class InputSpec:
    """What a model is built for, read from the dataset manifest.

    modality: "tabular" (x float32 [B, F]), "image" (float32 [B, C, H, W]) or "text"
    (int64 token ids [B, L]); input_shape is the per-row shape ([F], [C, H, W] or [L]);
    out_features the output width (classes, 1 for regression and bce, vocab_size for
    language modelling).
    """

    modality: str
    input_shape: tuple[int, ...]
    out_features: int
    task: str
    vocab_size: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return prod(self.input_shape)

    def example(self, rows: int = 2) -> torch.Tensor:
        """A batch of zeros shaped and typed like the dataset's batches."""
        if self.modality == "text":
            return torch.zeros((rows, *self.input_shape), dtype=torch.long)
        return torch.zeros((rows, *self.input_shape), dtype=torch.float32)


Builder = Callable[[ModelConfig, InputSpec], nn.Module]

# model.name -> builder; `custom` is resolved from model.path instead.
MODELS: dict[str, Builder] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "gru": build_gru,
    "lstm": build_lstm,
    "transformer": build_transformer,
    "gpt": build_gpt,
}


# What each built-in family reads: the modalities it takes, and what it predicts ("row": one
# output per row, for classification and regression; "next_token": logits at every position, for
# language modelling). Sequence models read tabular rows as F steps and images as H rows.
FITS: dict[str, tuple[frozenset[str], str]] = {
    "mlp": (frozenset({"tabular", "image"}), "row"),
    "cnn": (frozenset({"image"}), "row"),
    "gru": (frozenset({"tabular", "image", "text"}), "row"),
    "lstm": (frozenset({"tabular", "image", "text"}), "row"),
    "transformer": (frozenset({"tabular", "image", "text"}), "row"),
    "gpt": (frozenset({"text"}), "next_token"),
}
# With `model.name` left out: the family that suits the prepared dataset (benchmarks/quality.py
# measures each against its modality's classical baseline).
DEFAULTS = {"tabular": "mlp", "image": "cnn", "text": "gru", "language_modeling": "gpt"}


def _predicts(spec: InputSpec) -> str:
    return "next_token" if spec.task == "language_modeling" else "row"


def default_model(spec: InputSpec) -> str:
    """The built-in family chosen when `model.name` is left out."""
    return DEFAULTS["language_modeling" if spec.task == "language_modeling" else spec.modality]


def check_fits(config: ModelConfig, spec: InputSpec) -> None:
    """A built-in family that cannot read the dataset's modality, or predicts the wrong thing for
    its task, is refused in one line naming model.name, the modality and what would fit."""
    if config.name in (None, "custom"):
        return
    modalities, predicts = FITS[config.name]
    if spec.modality in modalities and predicts == _predicts(spec):
        return
    fitting = [name for name, (m, p) in FITS.items() if spec.modality in m and p == _predicts(spec)]
    raise UserError(
        f"model.name: {config.name} does not fit the dataset's modality ({spec.modality} data for "
        f"{spec.task}); use {' or '.join(fitting)}, or leave model.name out for {default_model(spec)}"
    )


def resolve_model(config: ModelConfig, spec: InputSpec) -> ModelConfig:
    """`config` with `name` filled in from the dataset when it was left out, checked against it."""
    if config.name is None:
        config = config.model_copy(update={"name": default_model(spec)})
        # The config's own validator skipped the width checks of a family it did not know yet.
        if config.name in ("transformer", "gpt") and config.embed_dim % config.num_heads:
            raise UserError(f"model.num_heads: {config.num_heads} does not divide embed_dim {config.embed_dim} "
                            f"(of {config.name}, the default for this dataset)")
    check_fits(config, spec)
    return config


def describe_model(config: ModelConfig, data) -> str:
    """`model NAME` for the run's first line; a family chosen by default says why (reads the
    prepared dataset's manifest)."""
    if config.name is not None:
        return f"model {config.name}"
    from stoker.datasets.manifest import Manifest

    spec = spec_from_manifest(Manifest.read(data.output, data.s3))
    kind = "language modelling" if spec.task == "language_modeling" else f"{spec.modality} data"
    return f"model {default_model(spec)} (the default for {kind})"


def spec_from_manifest(manifest, loss_name: str = "auto") -> InputSpec:
    """The InputSpec of a prepared dataset (older manifests are tabular by default)."""
    modality = getattr(manifest, "modality", None) or "tabular"
    shape = getattr(manifest, "input_shape", None) or [len(manifest.features)]
    vocab = getattr(manifest, "vocab_size", None)
    if manifest.task == "language_modeling":
        if not vocab:
            raise UserError("data: language modelling needs the manifest's vocab_size")
        out = vocab
    elif manifest.task == "classification":
        out = 1 if loss_name == "bce" else manifest.num_classes
    else:
        out = 1
    return InputSpec(modality, tuple(int(s) for s in shape), int(out), manifest.task, vocab)


def load_user_builder(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"model.path: cannot import {module_name!r}: {exc}") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise UserError(f"model.path: {module_name!r} has no callable {attr!r}")
    return builder


def build_model(config: ModelConfig, spec: InputSpec) -> nn.Module:
    config = resolve_model(config, spec)
    if config.name == "custom":
        assert config.path is not None
        model = load_user_builder(config.path)(spec, **config.options)
        if not isinstance(model, nn.Module):
            raise UserError(
                f"model.path: {config.path} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model
    return MODELS[config.name](config, spec)


def parameter_count(model: nn.Module) -> int:
    """Parameters of a model, partitioned (ZeRO-3) or not."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def check_model(config: ModelConfig, spec: InputSpec) -> int:
    """Build the model once and run a two-row batch through it, so a model that does not fit
    the dataset fails on the driver with one line instead of inside every worker. Returns the
    model's parameter count."""
    config = resolve_model(config, spec)
    model = build_model(config, spec)
    example = spec.example()
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model: {config.name} does not accept the dataset's input {list(example.shape)} "
            f"({spec.modality}, from the manifest): {first}"
        ) from None
    expected = (2, spec.input_shape[0], spec.out_features) if spec.task == "language_modeling" else (2, spec.out_features)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model: {config.name} returned {got} for a batch of 2; expected {list(expected)}")
    return parameter_count(model)
