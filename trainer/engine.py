"""How the model is distributed: the DeepSpeed config that stoker generates from the run config.

The JSON is written into the run directory (`deepspeed_config.json`) so it can be inspected and
reused with plain DeepSpeed.
"""

import math
from typing import Any

from stoker.trainer.config import TrainConfig

# DeepSpeed names; SGD and RMSprop are not DeepSpeed optimizers, and DeepSpeed falls back to
# `getattr(torch.optim, type)` for them, so the exact torch spelling matters.
_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "rmsprop": "RMSprop"}


def optimizer_steps(train_rows: int, world_size: int, train: TrainConfig) -> int:
    """Optimizer steps per epoch: Ray splits the train split equally, dropping the remainder."""
    rows_per_rank = train_rows // world_size
    micro_batches = math.ceil(rows_per_rank / train.batch_size)
    return max(1, micro_batches // train.deepspeed.gradient_accumulation_steps)


def deepspeed_config(train: TrainConfig, world_size: int, steps_per_epoch: int) -> dict[str, Any]:
    ds = train.deepspeed
    opt = train.optimizer
    params: dict[str, Any] = {"lr": opt.lr, "weight_decay": opt.weight_decay}
    if opt.name in ("adam", "adamw"):
        params["betas"] = list(opt.betas)
        if not ds.offload_optimizer:
            # torch's Adam instead of DeepSpeed's FusedAdam, which needs a CUDA compile.
            params["torch_adam"] = True
    else:
        params["momentum"] = opt.momentum

    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": train.batch_size * ds.gradient_accumulation_steps * world_size,
        "optimizer": {"type": _OPTIMIZERS[opt.name], "params": params},
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "fp16": {"enabled": ds.fp16},
        "gradient_clipping": ds.gradient_clipping,
        # stoker reports its own metrics each epoch; DeepSpeed's step log would flood the output.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = True
    if ds.zero_stage > 0 and opt.name in ("sgd", "rmsprop"):
        # DeepSpeed refuses torch optimizers it has not tested with ZeRO unless told; both
        # only keep per-parameter state that ZeRO partitions like Adam's.
        config["zero_allow_untested_optimizer"] = True
    schedule = _scheduler(train, steps_per_epoch * train.epochs)
    if schedule:
        config["scheduler"] = schedule
    return config


def _scheduler(train: TrainConfig, total_steps: int) -> dict[str, Any] | None:
    sched = train.schedule
    if sched.name in ("step", "plateau"):
        return None  # epoch/validation-driven: stoker.trainer.schedule applies them
    warmup = min(sched.warmup_steps, max(total_steps - 1, 0))
    lr = train.optimizer.lr
    if sched.name == "warmup_cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total_steps, "warmup_num_steps": warmup,
            "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0, "warmup_type": "linear",
        }}
    if sched.name == "warmup_linear":
        return {"type": "WarmupDecayLR", "params": {
            "total_num_steps": total_steps, "warmup_num_steps": max(warmup, 1),
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_type": "linear",
        }}
    if warmup > 0:
        return {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup, "warmup_type": "linear",
        }}
    return None
