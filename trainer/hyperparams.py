"""Apply the run config's optimizer hyperparameters over those restored from a checkpoint.

DeepSpeed's `load_checkpoint` restores the optimizer's param groups (lr, weight decay,
betas/momentum) as they were saved. A resume that changes them in the config (Population
Based Training exploits a checkpoint and perturbs `train.optimizer.lr`; a user lowers the
rate and reruns) would otherwise keep the checkpoint's values without a word. DeepSpeed's
schedulers only save their step counter and compute the rate from the config they were built
with, so the right rate after a resume is what the scheduler gives at the restored step.

An ordinary resume (same config) changes nothing: every value is only written when it
differs, so such a resume stays bit-identical to an uninterrupted run.
"""

from typing import Any

from stoker.trainer.config import OptimizerConfig

_ADAM = ("adam", "adamw")


def optimizer_record(config: OptimizerConfig) -> dict[str, Any]:
    """What a checkpoint records about the optimizer config it was trained with."""
    return config.model_dump(mode="json")


def apply_optimizer_config(optimizer, scheduler, config: OptimizerConfig, saved: dict[str, Any] | None) -> list[str]:
    """Set the param groups' hyperparameters from `config` where they differ from what was
    restored; returns one line per change (`train.optimizer.lr: 0.003 -> 0.01`).

    `scheduler` is DeepSpeed's (or None); `saved` is `optimizer_record` of the checkpoint's
    config, or None for checkpoints written before stoker recorded it.
    """
    changes: list[str] = []
    groups = optimizer.param_groups
    wanted: dict[str, Any] = {"weight_decay": config.weight_decay}
    if config.name in _ADAM:
        wanted["betas"] = tuple(config.betas)
    else:
        wanted["momentum"] = config.momentum
    for key, value in wanted.items():
        old = groups[0].get(key)
        if key in groups[0] and _differs(old, value):
            for group in groups:
                group[key] = value
            changes.append(f"train.optimizer.{key}: {_show(old)} -> {_show(value)}")

    # The learning rate: the restored group value is a point on the old schedule, so compare
    # the configured peak rates, and recompute the current point from the new one.
    old_peak = saved.get("lr") if saved else (None if scheduler is not None else groups[0]["lr"])
    if old_peak is not None and _differs(old_peak, config.lr):
        if scheduler is not None:
            rates = scheduler.get_lr()
            if len(rates) == 1:
                rates = rates * len(groups)
        else:
            rates = [config.lr] * len(groups)
        for group, rate in zip(groups, rates, strict=True):
            group["lr"] = rate
        changes.append(f"train.optimizer.lr: {_show(old_peak)} -> {_show(config.lr)}")
    return changes


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
        return [float(v) for v in old] != [float(v) for v in new]
    return float(old) != float(new)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{float(v):g}" for v in value) + "]"
    return f"{float(value):g}"
