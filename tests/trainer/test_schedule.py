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
    for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.95, 0.8, 0.8, 0.7]):
        s.end_epoch(epoch, loss)
    # patience 1, as for early stopping: each epoch without an improvement decays (epochs 2,
    # 3 and 5; an equal value is no improvement): 1 -> 0.1 -> 0.01 -> 0.001
    assert s.factor == pytest.approx(0.001)
    for _ in range(4):
        s.end_epoch(9, 1.0)
    assert s.lr(100) == pytest.approx(0.005)


def test_warmup_and_state_round_trip_and_optimizer_rate():
    s = EpochSchedule(ScheduleConfig(name="plateau", warmup_steps=4), peak_lr=0.2)
    assert [round(s.lr(i), 3) for i in range(5)] == [0.05, 0.1, 0.15, 0.2, 0.2]
    s.factor = 0.5
    s.end_epoch(0, 0.7)
    other = EpochSchedule(ScheduleConfig(name="plateau"), peak_lr=0.2)
    other.load_state_dict(s.state_dict())
    assert other.plateau.best == s.plateau.best
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    other.apply(opt, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_plateau_and_early_stopping_share_one_patience():
    from stoker.trainer.ranking import Patience, Score

    s = EpochSchedule(ScheduleConfig(name="plateau", patience=2, gamma=0.5), peak_lr=1.0, mode="max")
    stopping = Patience(2, "max")
    decayed_at, stopped_at = [], []
    for epoch, accuracy in enumerate([0.5, 0.6, 0.6, 0.6, 0.7]):
        before = s.factor
        s.end_epoch(epoch, Score(accuracy, 1.0))
        stopping.update(Score(accuracy, 1.0))
        if s.factor < before:
            decayed_at.append(epoch)
        if stopping.exhausted:
            stopped_at.append(epoch)
    assert decayed_at == stopped_at[:1] == [3]
    # The old checkpoint format still loads.
    old = EpochSchedule(ScheduleConfig(name="plateau", patience=2), peak_lr=1.0)
    old.load_state_dict({"factor": 0.5, "best": 0.7, "bad_epochs": 1})
    assert old.plateau.since == 1 and old.plateau.best.metric == 0.7


def test_stoker_schedules_leave_deepspeed_without_a_scheduler():
    for name in ("step", "plateau"):
        config = deepspeed_config(TrainConfig(schedule={"name": name, "warmup_steps": 5}), 2, 10)
        assert "scheduler" not in config
