"""Learning-rate schedules stoker applies itself: step decay and reduce-on-plateau.

DeepSpeed's own schedulers (WarmupLR, WarmupCosineLR, WarmupDecayLR) cover the warm-up and
decay-to-zero schedules and stay in the written DeepSpeed JSON. Step decay and plateau depend
on epochs and on validation results, so stoker sets the optimizer's rate before each step
from this small state machine, whose state travels in the checkpoint.
"""

from dataclasses import dataclass

from stoker.trainer.config import ScheduleConfig


@dataclass
class EpochSchedule:
    config: ScheduleConfig
    peak_lr: float
    mode: str = "max"
    """Whether the plateau metric is maximised or minimised."""
    factor: float = 1.0
    best: float | None = None
    bad_epochs: int = 0

    def lr(self, step: int) -> float:
        """The rate for optimizer step `step` (0-based): warm-up, then peak x decay factor."""
        warm = min(1.0, (step + 1) / self.config.warmup_steps) if self.config.warmup_steps else 1.0
        return max(self.peak_lr * self.factor * warm, min(self.config.min_lr, self.peak_lr * warm))

    def end_epoch(self, epoch: int, score: float | None) -> None:
        """Called after each epoch's validation with the value of `train.metric`."""
        if self.config.name == "step":
            self.factor = self.config.gamma ** ((epoch + 1) // self.config.step_epochs)
        elif self.config.name == "plateau" and score is not None:
            better = self.best is None or (score > self.best if self.mode == "max" else score < self.best)
            if better:
                self.best, self.bad_epochs = score, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > self.config.patience:
                    self.factor *= self.config.gamma
                    self.bad_epochs = 0

    def apply(self, optimizer, step: int) -> None:
        rate = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = rate

    def state_dict(self) -> dict:
        return {"factor": self.factor, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.factor, self.best, self.bad_epochs = state["factor"], state["best"], state["bad_epochs"]


def stoker_schedule(config: ScheduleConfig, peak_lr: float, mode: str) -> EpochSchedule | None:
    return EpochSchedule(config, peak_lr, mode) if config.name in ("step", "plateau") else None

