"""Learning-rate schedules stoker applies itself: step decay and reduce-on-plateau.

DeepSpeed's own schedulers (WarmupLR, WarmupCosineLR, WarmupDecayLR) cover the warm-up and
decay-to-zero schedules and stay in the written DeepSpeed JSON. Step decay and plateau depend
on epochs and on validation results, so stoker sets the optimizer's rate before each step
from this small state machine, whose state travels in the checkpoint.
"""

from dataclasses import dataclass, field

from stoker.trainer.config import ScheduleConfig
from stoker.trainer.ranking import Patience, Score


@dataclass
class EpochSchedule:
    config: ScheduleConfig
    peak_lr: float
    mode: str = "max"
    """Whether the plateau metric is maximised or minimised."""
    factor: float = 1.0
    plateau: Patience = field(init=False)
    """Epochs without improvement, by the run's one definition of better (stoker.trainer.ranking)."""

    def __post_init__(self) -> None:
        self.plateau = Patience(self.config.patience, self.mode)

    def lr(self, step: int) -> float:
        """The rate for optimizer step `step` (0-based): warm-up, then peak x decay factor."""
        warm = min(1.0, (step + 1) / self.config.warmup_steps) if self.config.warmup_steps else 1.0
        return max(self.peak_lr * self.factor * warm, min(self.config.min_lr, self.peak_lr * warm))

    def end_epoch(self, epoch: int, score: Score | float | None) -> None:
        """Called after each epoch's validation with `train.metric` and the validation loss
        (a bare number: the metric alone). Plateau: once `patience` epochs in a row have not
        improved (at least one), the rate decays and the count starts again."""
        if self.config.name == "step":
            self.factor = self.config.gamma ** ((epoch + 1) // self.config.step_epochs)
        elif self.config.name == "plateau" and score is not None:
            if not isinstance(score, Score):
                score = Score(float(score), float("inf"))
            if not self.plateau.update(score) and self.plateau.exhausted:
                self.factor *= self.config.gamma
                self.plateau.since = 0

    def apply(self, optimizer, step: int) -> None:
        rate = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = rate

    def state_dict(self) -> dict:
        return {"factor": self.factor, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.factor = state["factor"]
        if "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])
        else:  # a checkpoint written before the shared definition of better
            self.plateau.load_state_dict({"best": state.get("best"), "since": state.get("bad_epochs", 0)})


def stoker_schedule(config: ScheduleConfig, peak_lr: float, mode: str) -> EpochSchedule | None:
    return EpochSchedule(config, peak_lr, mode) if config.name in ("step", "plateau") else None

