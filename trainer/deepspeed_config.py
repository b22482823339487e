"""How the model is distributed: the DeepSpeed config that stoker generates from the run config.

The JSON is written into the run directory (`deepspeed_config.json`) so it can be inspected and
reused with plain DeepSpeed.
"""

import math
from typing import Any

from stoker.trainer.config import TrainConfig

# DeepSpeed's communication buckets default to 5e8 elements (2 GB of fp32), sized for
# billion-parameter GPU models; the buffers they fill are transient memory on every rank.
# stoker sizes them to an eighth of the model (at least 5e6 elements, so small models still
# reduce in one collective, at most DeepSpeed's default).
BUCKET_MIN, BUCKET_MAX, BUCKET_FRACTION = 5_000_000, 500_000_000, 8

# DeepSpeed names; SGD and RMSprop are not DeepSpeed optimizers, and DeepSpeed falls back to
# `getattr(torch.optim, type)` for them, so the exact torch spelling matters.
_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "rmsprop": "RMSprop"}


def optimizer_steps(train_rows: int, world_size: int, train: TrainConfig) -> int:
    """Optimizer steps per epoch: Ray splits the train split equally, dropping the remainder."""
    rows_per_rank = train_rows // world_size
    micro_batches = math.ceil(rows_per_rank / train.batch_size)
    return max(1, micro_batches // train.deepspeed.gradient_accumulation_steps)


def planned_world_size(config: dict[str, Any]) -> int:
    """The world size the driver wrote `config` for."""
    per_rank = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    return max(config["train_batch_size"] // per_rank, 1)


def for_world_size(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """`config` for the world size the worker group actually has: an elastic run
    (`scaling.num_workers: [min, max]`) is planned for its largest size and may run smaller.
    The batch per worker is what stays: DeepSpeed requires train_batch_size = micro batch x
    accumulation x world size, so the global batch follows the number of workers."""
    if planned_world_size(config) == world_size:
        return config
    per_rank = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    return {**config, "train_batch_size": per_rank * world_size}


def bucket_elements(param_count: int) -> int:
    """Elements per ZeRO communication bucket for a model of `param_count` parameters."""
    return max(BUCKET_MIN, min(BUCKET_MAX, param_count // BUCKET_FRACTION))


def deepspeed_config(
    train: TrainConfig, world_size: int, steps_per_epoch: int, param_count: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; `param_count` (the model's parameters) sizes the ZeRO
    buckets, and DeepSpeed's defaults apply without it."""
    ds = train.deepspeed
    opt = train.optimizer
    params: dict[str, Any] = {"lr": opt.lr, "weight_decay": opt.weight_decay}
    if opt.name in ("adam", "adamw"):
        params["betas"] = list(opt.betas)
        if not ds.offload_optimizer:
            # torch's Adam instead of DeepSpeed's FusedAdam, which needs a CUDA compile.
            params["torch_adam"] = True
            # One fused kernel per step instead of foreach ops whose temporaries (a copy of
            # the second moments, among others) make the optimizer step the peak of memory.
            params["fused"] = True
    else:
        params["momentum"] = opt.momentum

    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0 and param_count is not None:
        zero.update(_buckets(ds.zero_stage, bucket_elements(param_count)))
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


def _buckets(stage: int, bucket: int) -> dict[str, Any]:
    sizes: dict[str, Any] = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if stage == 3:
        sizes.update({
            "stage3_prefetch_bucket_size": bucket,
            # DeepSpeed's defaults (1e9) keep every gathered layer alive from its forward to
            # its backward, i.e. the whole unpartitioned model, which undoes what ZeRO-3 is
            # chosen for. One bucket of gathered parameters at most; a layer needed again
            # within a bucket's worth of parameters (the last layers, whose backward follows
            # their forward at once) is kept rather than gathered twice, which a reuse
            # distance of 0 did for every layer: 0.72x the hand-written script's samples/s.
            "stage3_max_live_parameters": bucket,
            "stage3_max_reuse_distance": bucket,
        })
    return sizes


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
