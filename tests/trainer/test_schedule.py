"""Step decay and reduce-on-plateau, applied by stoker between optimizer steps."""

import pytest
import torch

from stoker.trainer.config import ScheduleConfig, TrainConfig
from stoker.trainer.deepspeed_config import deepspeed_config
from stoker.trainer.schedule import EpochSchedule


def test_step_decay_by_epoch():
    s = EpochSchedule(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), peak_lr=1.0)
    rates = []
    for epoch in range(5):
        rates.append(s.lr(100))
        s.end_epoch(epoch, None)
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_plateau_decays_after_patience_and_respects_min_lr():
    s = EpochSchedule(ScheduleConfig(name="plateau", patience=1, gamma=0.1, min_lr=0.005), peak_lr=1.0, mode="min")
    for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.95, 0.8, 0.9, 0.9]):
        s.end_epoch(epoch, loss)
    # decays after epochs 3 (two without improving on 0.9) and 6 (two after 0.8): 1 -> 0.1 -> 0.01
    assert s.factor == pytest.approx(0.01)
    for _ in range(4):
        s.end_epoch(9, 1.0)
    assert s.lr(100) == pytest.approx(0.005)


def test_warmup_and_state_round_trip_and_optimizer_rate():
    s = EpochSchedule(ScheduleConfig(name="plateau", warmup_steps=4), peak_lr=0.2)
    assert [round(s.lr(i), 3) for i in range(5)] == [0.05, 0.1, 0.15, 0.2, 0.2]
    s.factor, s.best, s.bad_epochs = 0.5, 0.7, 1
    other = EpochSchedule(ScheduleConfig(name="plateau"), peak_lr=0.2)
    other.load_state_dict(s.state_dict())
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    other.apply(opt, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_stoker_schedules_leave_deepspeed_without_a_scheduler():
    for name in ("step", "plateau"):
        config = deepspeed_config(TrainConfig(schedule={"name": name, "warmup_steps": 5}), 2, 10)
        assert "scheduler" not in config
