"""The config's optimizer hyperparameters win over a checkpoint's on resume (PBT perturbations)."""

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupLR

from stoker.trainer.config import OptimizerConfig
from stoker.trainer.hyperparams import apply_optimizer_config, optimizer_record


def restored(name="adamw", **saved):
    """An optimizer as DeepSpeed's load_checkpoint leaves it: the saved param groups."""
    params = [torch.nn.Parameter(torch.ones(3))]
    config = OptimizerConfig(name=name, **saved)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas), config
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum), config


def test_same_config_changes_nothing():
    optimizer, config = restored(lr=0.003, weight_decay=0.01)
    before = [dict(g) for g in optimizer.param_groups]
    assert apply_optimizer_config(optimizer, None, config, optimizer_record(config)) == []
    assert [dict(g) for g in optimizer.param_groups] == before


def test_perturbed_lr_weight_decay_and_betas_are_applied():
    optimizer, saved = restored(lr=0.003, weight_decay=0.01)
    new = OptimizerConfig(lr=0.0036, weight_decay=0.02, betas=(0.8, 0.99))
    changes = apply_optimizer_config(optimizer, None, new, optimizer_record(saved))
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.0036 and group["weight_decay"] == 0.02 and group["betas"] == (0.8, 0.99)
    assert changes == ["train.optimizer.weight_decay: 0.01 -> 0.02", "train.optimizer.betas: [0.9, 0.999] -> [0.8, 0.99]",
                       "train.optimizer.lr: 0.003 -> 0.0036"]
    # The optimizer really steps with the new rate: AdamW's first step moves each weight by
    # about lr (x (1 - lr x wd) for the decay).
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    moved = 1 - optimizer.param_groups[0]["params"][0].detach()
    assert moved == pytest.approx(torch.full((3,), 0.0036 + 0.0036 * 0.02), rel=1e-3)


def test_sgd_momentum_and_old_checkpoints_without_a_record():
    optimizer, _ = restored("sgd", lr=0.1, momentum=0.9)
    changes = apply_optimizer_config(optimizer, None, OptimizerConfig(name="sgd", lr=0.05, momentum=0.5), None)
    assert optimizer.param_groups[0]["momentum"] == 0.5 and optimizer.param_groups[0]["lr"] == 0.05
    assert changes == ["train.optimizer.momentum: 0.9 -> 0.5", "train.optimizer.lr: 0.1 -> 0.05"]


def test_scheduled_rate_is_recomputed_at_the_restored_step():
    # A warm-up schedule saved mid-warm-up at peak 0.01; the config now says peak 0.02.
    optimizer, saved = restored(lr=0.01)
    old = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=0.01, warmup_num_steps=10, warmup_type="linear")
    for _ in range(4):
        old.step()
    state, restored_lr = old.state_dict(), optimizer.param_groups[0]["lr"]
    new = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=0.02, warmup_num_steps=10, warmup_type="linear")
    new.load_state_dict(state)
    optimizer.param_groups[0]["lr"] = restored_lr  # what load_checkpoint restores
    changes = apply_optimizer_config(optimizer, new, OptimizerConfig(lr=0.02), optimizer_record(saved))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * restored_lr)
    assert changes == ["train.optimizer.lr: 0.01 -> 0.02"]
