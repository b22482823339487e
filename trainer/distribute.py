"""How a model is distributed: build it on each rank and wrap it in a DeepSpeed engine.

Under ZeRO-3 the model is built inside `deepspeed.zero.Init`, which partitions each layer's
parameters as the layer is constructed: no rank ever holds the whole fp32 model, only its
1/world_size share (plus one layer at a time while it is built). Built outside, every rank
would first allocate the full model and DeepSpeed would then copy its partition out of it.
"""

from typing import Any

import deepspeed
from torch import nn

from stoker.trainer.config import ModelConfig
from stoker.trainer.models import InputSpec, build_model


def build_engine(model_config: ModelConfig, spec: InputSpec, ds_config: dict[str, Any]):
    """(engine, optimizer, scheduler) for this rank. Seed the RNGs identically on every rank
    before calling, so every rank starts from the same weights."""
    if ds_config["zero_optimization"]["stage"] == 3:
        # zero.Init reads the world size from deepspeed.comm, which deepspeed.initialize
        # would only set up later: join the process group Ray Train created now.
        deepspeed.init_distributed()
        # zero.Init also casts to the configured precision (bf16) as it partitions, and
        # broadcasts rank 0's initial values.
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(model_config, spec)
    else:
        model = build_model(model_config, spec)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config,
    )
    return engine, optimizer, scheduler


def parameter_count(model: nn.Module) -> int:
    """Parameters of a model, partitioned (ZeRO-3) or not."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
