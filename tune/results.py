"""The results table (one row per trial) and the best trial's config as a ready-to-train YAML."""

import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from stoker.atomic import atomic_file, write_text
from stoker.trainer.ranking import best_position
from stoker.tune.config import TuneConfig
from stoker.tune.space import apply, get_path, sampled_values


def epochs_run(metrics: dict[str, Any]) -> int:
    """Epochs a trial has trained, from its last result: Tune's iteration count, or the epoch
    the trial's Train run reported when that is further (after a resume from an experiment
    snapshot older than the run's own checkpoints, Tune's count lags the epochs trained)."""
    iterations = int(metrics.get("training_iteration", 0) or 0)
    epoch = metrics.get("epoch")
    return max(iterations, int(epoch) + 1) if isinstance(epoch, int | float) else iterations


def results_table(results, tune_cfg: TuneConfig, metric: str, mode: str, max_epochs: int,
                  unfinished: frozenset[str] = frozenset(),
                  curves: dict[str, list[tuple[int, float]]] | None = None) -> pd.DataFrame:
    """Trial, config values, best and last metric, epochs run, status and time of every trial;
    `unfinished`: trials an interrupted search left running (status "unfinished" unless they had
    trained all `max_epochs`). `curves`: each trial's metric by epoch from the search log
    (`stoker.tune.search_log.curves_of`); a trial not in it (an experiment from before the log)
    falls back to its result's metrics history."""
    rows = []
    curves = curves or {}
    # Tune's trial ids are random; the result grid lists trials in the order they were created.
    for order, result in enumerate(results):
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        values = sampled_values(result.config, tune_cfg) if result.config else {}
        curve = curves[trial_id] if trial_id in curves else history_curve(result, metric)
        scores = [v for _, v in curve if v == v]
        best = best_position(scores, mode)
        epochs = epochs_run(metrics)
        if result.error is not None:
            status = "error"
        elif trial_id in unfinished and epochs < max_epochs:
            # (One interrupted after its last epoch, before Tune recorded its end, is complete.)
            status = "unfinished"
        elif epochs == 0:
            status = "not run"
        elif epochs < max_epochs:
            status = "stopped"
        else:
            status = "completed"
        rows.append({
            "trial": trial_id,
            "order": order,
            **{path: _cell(value) for path, value in values.items()},
            metric: math.nan if best is None else scores[best],
            f"last_{metric}": scores[-1] if scores else math.nan,
            "epochs": epochs,
            "status": status,
            "time_s": float(metrics.get("time_total_s", 0.0) or 0.0),
        })
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values("order", kind="stable").reset_index(drop=True)
    return table


def history_curve(result, metric: str) -> list[tuple[int, float]]:
    """A trial's metric by epoch from Tune's own results history (experiments from before the
    search log; the tests' synthetic results)."""
    history = result.metrics_dataframe
    if history is None or metric not in history or not len(history):
        return []
    rows = history[["training_iteration", metric]].dropna()
    return [(int(epoch), float(value)) for epoch, value in rows.itertuples(index=False)]


def _cell(value: Any) -> Any:
    # Lists (layer widths) become strings so the table stays one scalar per cell in Parquet.
    return yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, list | dict) else value


def best_row(table: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    scored = table[table[metric].notna() & (table["status"] != "error")] if len(table) else table
    if not len(scored):
        return None
    return scored.iloc[best_position(scored[metric].tolist(), mode)]


def write_table(table: pd.DataFrame, directory: Path) -> None:
    for name, write in (("results.csv", lambda p: table.to_csv(p, index=False)),
                        ("results.parquet", lambda p: table.to_parquet(p, index=False))):
        with atomic_file(directory / name) as tmp:
            write(tmp)


def write_best_config(table: pd.DataFrame, plan, path: Path) -> Path | None:
    """The base config with the best trial's values, named `<experiment>-best`, no tune section:
    `stoker train best.yaml` trains the best trial again."""
    row = best_row(table, plan.metric, plan.mode)
    if row is None:
        return None
    header = (f"# best trial {row['trial']} of search {plan.path.name}: "
              f"{plan.metric} {row[plan.metric]:.6g} after {row['epochs']} epochs\n")
    return write_trial_config(row, plan.base, plan.run.tune, plan.path.name, path, header)


def write_trial_config(row: pd.Series, base: dict[str, Any], tune_cfg: TuneConfig, experiment: str, path: Path,
                       header: str) -> Path:
    """The base config (a dict) with one trial's values (a results row) as `<experiment>-best`,
    under a header comment; no tune section."""
    values = {p: _uncell(row[p], get_path(base, p)) for p in tune_cfg.space}
    config = apply(base, values, tune_cfg.space)
    config.pop("tune", None)
    config["name"] = f"{experiment}-best"
    write_text(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def _uncell(value: Any, like: Any) -> Any:
    if isinstance(like, list | dict) and isinstance(value, str):
        return yaml.safe_load(value)
    if hasattr(value, "item"):  # numpy scalars -> Python, so the YAML stays plain
        return value.item()
    return value
