"""Multi-objective searches (`tune.metrics`): which metrics, how Optuna's multi-objective sampler
sees them, the Pareto front of the finished trials, and the trade-off a user picks from it.

A trial's objectives are the values of its last result (the ones Ray's Optuna searcher tells
the study when the trial completes), so every point of the front is one model at one epoch;
`best_val_<metric>` scores a trial by its best epoch instead. Errored trials and trials with a
missing objective are never on the front.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stoker.errors import UserError
from stoker.trainer import metrics as m
from stoker.tune.config import TuneConfig
from stoker.tune.space import reported_metrics

# Costs every training reports besides its scores (trainer/loop.py's record; Tune adds the
# trial's running training time), with the direction that is better.
COSTS = {"time_total_s": "min", "epoch_time_s": "min", "samples_per_s": "max"}
FRONT = "front"
"""Results column: the trial's index on the Pareto front (what `--pick` takes), empty off it."""
PARETO = "pareto"
"""Results column: whether no other trial is at least as good on every objective and better on one."""


@dataclass(frozen=True)
class Objective:
    name: str
    mode: str  # "min" | "max"

    @property
    def column(self) -> str:
        """The results column that holds the objective's value (from the trial's last result)."""
        return f"last_{self.name}"


def objectives_of(tune_cfg: TuneConfig) -> list[Objective]:
    """The objectives of a multi-objective search, modes resolved; empty for a single metric."""
    objectives = []
    for spec in tune_cfg.metrics or []:
        bare = spec.name.removeprefix("best_").removeprefix("val_").removeprefix("train_")
        objectives.append(Objective(spec.name, spec.mode or COSTS.get(spec.name) or m.metric_mode(bare)))
    return objectives


def check_objectives(tune_cfg: TuneConfig, task: str, train_metric: str | None) -> list[Objective]:
    """`objectives_of`, refusing a metric the trainer never reports for this task."""
    known = [*reported_metrics(task, train_metric or m.default_metric(task)), *COSTS]
    for index, spec in enumerate(tune_cfg.metrics or []):
        if spec.name not in known:
            raise UserError(f"tune.metrics[{index}].name: {spec.name!r} is never reported for {task}; "
                            f"choose from {', '.join(known)}")
    return objectives_of(tune_cfg)


def searcher_objectives(objectives: list[Objective]) -> dict[str, Any]:
    """OptunaSearch's `metric`/`mode` lists. Tune's own TuneConfig takes one metric, so a
    multi-objective search gives the lists to the searcher and none to Tune (Tune would
    otherwise overwrite the searcher's lists with its one metric)."""
    return {"metric": [o.name for o in objectives], "mode": [o.mode for o in objectives]}


def single_metric_scheduler(scheduler, objectives: list[Objective]):
    """The scheduler, set to the first objective: early stopping and PBT rank trials by one
    metric, and Tune hands them none in a multi-objective search."""
    if scheduler is not None and objectives:
        scheduler.set_search_properties(objectives[0].name, objectives[0].mode)
    return scheduler


def last_values(results, objectives: list[Objective]) -> dict[str, dict[str, float]]:
    """Trial id -> objective column -> the value of the trial's last result."""
    values = {}
    for result in results:
        metrics = result.metrics or {}
        trial = metrics.get("trial_id") or Path(result.path).name
        values[trial] = {o.column: _number(metrics.get(o.name)) for o in objectives}
    return values


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else np.nan


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Mask of the rows of `points` (objectives to minimise, one column each) that no other row
    dominates: at most as large everywhere and smaller somewhere. Duplicates keep each other."""
    keep = np.ones(len(points), dtype=bool)
    for i, point in enumerate(points):
        dominated_by = np.all(points <= point, axis=1) & np.any(points < point, axis=1)
        keep[i] = not dominated_by.any()
    return keep


def mark_front(table: pd.DataFrame, results, objectives: list[Objective]) -> pd.DataFrame:
    """The results table with each objective's last value, `pareto` and `front` (the trial's
    index on the front, best first on the first objective) columns added."""
    if not objectives or not len(table):
        return table
    table = table.copy()
    values = last_values(results, objectives)
    for objective in objectives:
        # The first objective's column is already there (the table's own last_<metric>).
        if objective.column not in table:
            table[objective.column] = [values.get(t, {}).get(objective.column, np.nan) for t in table["trial"]]
    columns = [o.column for o in objectives]
    scored = table[table[columns].notna().all(axis=1) & (table["status"] != "error")]
    signs = np.array([1.0 if o.mode == "min" else -1.0 for o in objectives])
    on_front = non_dominated(scored[columns].to_numpy(dtype=float) * signs)
    table[PARETO] = False
    table.loc[scored.index[on_front], PARETO] = True
    front = front_rows(table, objectives)
    table[FRONT] = pd.Series(range(len(front)), index=front.index, dtype="Int64")
    return table


def front_rows(table: pd.DataFrame, objectives: list[Objective]) -> pd.DataFrame:
    """The trials on the Pareto front, best first on the first objective (then the next...)."""
    front = table[table[PARETO].astype(bool)] if PARETO in table else table.iloc[0:0]
    columns = [o.column for o in objectives]
    return front.sort_values(columns, ascending=[o.mode == "min" for o in objectives], kind="stable")


def picked_row(table: pd.DataFrame, objectives: list[Objective], pick: int) -> pd.Series:
    """The front's trade-off number `pick`; UserError naming `--pick` when there is none."""
    front = front_rows(table, objectives)
    if not len(front):
        raise UserError("--pick: no trial of this search is on a Pareto front (none reported every metric)")
    if not 0 <= pick < len(front):
        raise UserError(f"--pick: {pick} is out of range; the Pareto front has {len(front)} "
                        f"trade-off{'' if len(front) == 1 else 's'} (0..{len(front) - 1})")
    return front.iloc[pick]


def describe_row(row: pd.Series, objectives: list[Objective]) -> str:
    return ", ".join(f"{o.name} {row[o.column]:.6g}" for o in objectives)


def front_table(table: pd.DataFrame, objectives: list[Objective], params: list[str]) -> pd.DataFrame:
    """The front as the CLI and report show it: pick index, trial, objectives, parameters."""
    front = front_rows(table, objectives)
    shown = front[["trial", *[o.column for o in objectives], *params, "epochs"]].copy()
    shown.insert(0, "pick", range(len(shown)))
    return shown.rename(columns={o.column: o.name for o in objectives})
