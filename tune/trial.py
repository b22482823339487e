"""One trial: the base run config with the trial's values, trained by a TorchTrainer launched
from a Tune function trainable (Train V2: `Tuner(TorchTrainer)` is rejected).

The trainable itself reserves a sliver of CPU (`DRIVER_RESOURCES`); the TorchTrainer's workers
reserve the real resources in their own placement group, which Ray removes when the trainable
(its owner) stops, so a trial that a scheduler stops frees its workers at once.
"""

from pathlib import Path
from typing import Any

from ray import tune

from stoker.tune.checkpoints import forward_train_checkpoints, train_run_name
from stoker.tune.config import TuneConfig
from stoker.tune.space import apply, sampled_values

# Not 0: a trainable with no resources can be scheduled without limit and starve the workers.
DRIVER_RESOURCES = {"cpu": 0.01}
TRIALS_DIR = "trials"


def trial_run(base: dict[str, Any], tune_cfg: TuneConfig, values: dict[str, Any], name: str, storage: str):
    """The validated run config of one trial (values by dotted path)."""
    from stoker.config import parse_config

    raw = apply(base, values, tune_cfg.space)
    raw.pop("tune", None)
    raw.update(name=name, storage=storage)
    return parse_config(raw, f"trial {name}")


def make_trainable(base: dict[str, Any], tune_cfg: TuneConfig, experiment_dir: Path):
    """The function trainable of a search; `base` is the run config as a dict."""
    trials_dir = Path(experiment_dir) / TRIALS_DIR

    def stoker_trial(config: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from stoker.trainer.run import build_trainer

        trial_id = tune.get_context().get_trial_id()
        name = train_run_name(trial_id, trials_dir, tune.get_checkpoint())
        run = trial_run(base, tune_cfg, sampled_values(config, tune_cfg), name, str(trials_dir))
        forward_train_checkpoints()
        prepared = build_trainer(run, callbacks=[TuneReportCallback()])
        prepared.trainer.fit()  # raises TrainingFailedError: the trial errors

    return stoker_trial
