"""What a finished search adds to its results table besides the trials themselves: the Pareto
front of a multi-objective search, hyperparameter importance, the record a later warm start
reads, and the report sections that show them. The runner calls `add_findings` once the table
is built; `stoker tune --pick` calls `pick_tradeoff` on a finished search.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from stoker.errors import UserError  # noqa: E402
from stoker.trainer.report import save_figure  # noqa: E402
from stoker.tune import importance as imp  # noqa: E402
from stoker.tune import objectives as obj  # noqa: E402
from stoker.tune.config import TuneConfig  # noqa: E402
from stoker.tune.results import write_best_config, write_trial_config  # noqa: E402
from stoker.tune.warm_start import RESULTS_FILE, write_space  # noqa: E402


@dataclass
class Findings:
    table: pd.DataFrame
    """The results table, with the objectives' last values, `pareto` and `front` columns for a
    multi-objective search."""
    objectives: list[obj.Objective]
    importance: pd.DataFrame
    """One row per space path, one importance column per objective (empty: too few trials)."""
    params: list[str]
    """The space's paths (the table's parameter columns)."""
    sections: list[str] = field(default_factory=list)
    """HTML for report.html."""


def add_findings(results, table: pd.DataFrame, tune_cfg: TuneConfig, metric: str, mode: str,
                 directory: Path) -> Findings:
    """Mark the front, compute importance (importance.csv, plots/importance.png, plots/pareto_front.png)
    and record the space for warm starts (search_space.json)."""
    objectives = obj.objectives_of(tune_cfg)
    table = obj.mark_front(table, results, objectives)
    scored_by = ([(o.name, o.column, o.mode) for o in objectives] if objectives else [(metric, metric, mode)])
    importance = imp.param_importances(table, tune_cfg, scored_by)
    imp.write_importance(importance, directory)
    write_space(tune_cfg, [(o.name, o.mode) for o in objectives] or [(metric, mode)], directory)
    plots = directory / "plots"
    plots.mkdir(exist_ok=True)
    sections = []
    if objectives and obj.PARETO in table and table[obj.PARETO].any():
        plot_front(table, objectives, plots / "pareto_front.png")
        front = obj.front_table(table, objectives, list(tune_cfg.space))
        sections.append("<h2>Pareto front</h2><p>Trade-offs no other trial beats on every metric "
                        "(each trial's last result); best.yaml holds pick 0; "
                        "<code>stoker tune CONFIG --pick INDEX</code> writes another.</p>"
                        '<img src="plots/pareto_front.png">' + _html(front))
    if len(importance):
        plot_importance(importance, plots / "importance.png")
        sections.append(f"<h2>Hyperparameter importance</h2><p>Optuna's {importance.attrs['method']} over "
                        f"{importance.attrs['trials']} scored trials "
                        f"(shares of the total per metric; rough with few trials).</p>"
                        '<img src="plots/importance.png">' + _html(importance))
    else:
        sections.append(f"<h2>Hyperparameter importance</h2><p>Needs at least {imp.MIN_TRIALS} scored trials.</p>")
    return Findings(table, objectives, importance, list(tune_cfg.space), sections)


def write_best(findings: Findings, plan, path: Path) -> Path | None:
    """best.yaml: the best trial, or for a multi-objective search the front's first trade-off."""
    if not findings.objectives:
        return write_best_config(findings.table, plan, path)
    if obj.PARETO not in findings.table or not findings.table[obj.PARETO].any():
        return None
    return _write_pick(findings.table, findings.objectives, 0, plan.base, plan.run.tune, plan.path, path)


def pick_tradeoff(base: dict[str, Any], tune_cfg: TuneConfig, directory: Path, pick: int) -> tuple[Path, str]:
    """best.yaml for trade-off `pick` of a finished multi-objective search's front; (the path,
    a line describing the trade-off). UserError naming `--pick` otherwise."""
    objectives = obj.objectives_of(tune_cfg)
    if not objectives:
        raise UserError("--pick: only for a multi-objective search (tune.metrics); this one optimises one metric")
    if not (directory / RESULTS_FILE).is_file():
        raise UserError(f"--pick: no finished search at {directory} (no {RESULTS_FILE}); run stoker tune first")
    table = pd.read_parquet(directory / RESULTS_FILE)
    if obj.PARETO not in table:
        raise UserError(f"--pick: {directory}'s results mark no Pareto front; run the search with tune.metrics again")
    row = obj.picked_row(table, objectives, pick)
    path = _write_pick(table, objectives, pick, base, tune_cfg, directory, directory / "best.yaml")
    return path, f"trade-off {pick}: trial {row['trial']}, {obj.describe_row(row, objectives)}"


def _write_pick(table, objectives, pick: int, base, tune_cfg, directory: Path, path: Path) -> Path:
    row = obj.picked_row(table, objectives, pick)
    header = (f"# trade-off {pick} of the Pareto front of search {directory.name}: trial {row['trial']}, "
              f"{obj.describe_row(row, objectives)} after {row['epochs']} epochs\n")
    return write_trial_config(row, base, tune_cfg, directory.name, path, header)


def _html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", escape=True)


def front_lines(findings: Findings) -> list[str]:
    """The front as text for the CLI (pick index first)."""
    if not findings.objectives or obj.PARETO not in findings.table or not findings.table[obj.PARETO].any():
        return []
    front = obj.front_table(findings.table, findings.objectives, findings.params)
    return ["", "Pareto front (stoker tune CONFIG --pick INDEX writes best.yaml for one):",
            front.to_string(index=False, float_format=lambda v: f"{v:.4g}")]


def importance_lines(findings: Findings) -> list[str]:
    if not len(findings.importance):
        return []
    return ["", f"hyperparameter importance (Optuna {findings.importance.attrs['method']}, "
                f"{findings.importance.attrs['trials']} trials):",
            findings.importance.to_string(index=False, float_format=lambda v: f"{v:.3f}")]


def plot_front(table: pd.DataFrame, objectives: list[obj.Objective], path: Path) -> None:
    """The first objective against each other one: every scored trial, the front joined up and
    numbered by pick index."""
    first, others = objectives[0], objectives[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(6 * len(others), 4.5), squeeze=False)
    front = obj.front_rows(table, objectives)
    for ax, other in zip(axes[0], others, strict=True):
        scored = table[table[first.column].notna() & table[other.column].notna() & (table["status"] != "error")]
        ax.scatter(scored[other.column], scored[first.column], s=16, color="0.6", label="trial")
        line = front.sort_values(other.column)
        ax.plot(line[other.column], line[first.column], color="C3", marker="o", label="Pareto front")
        for pick, (_, row) in enumerate(front.iterrows()):
            ax.annotate(str(pick), (row[other.column], row[first.column]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{other.name} ({other.mode})")
        ax.set_ylabel(f"{first.name} ({first.mode})")
        ax.legend()
    fig.suptitle("Pareto front (numbers: --pick index)")
    save_figure(fig, path)


def plot_importance(frame: pd.DataFrame, path: Path) -> None:
    objectives = [c for c in frame.columns if c != "parameter"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(frame) * len(objectives) + 1.5))
    height = 0.8 / len(objectives)
    for i, objective in enumerate(objectives):
        positions = [row + i * height for row in range(len(frame))]
        ax.barh(positions, frame[objective], height=height, label=objective)
    ax.set_yticks([row + 0.4 - height / 2 for row in range(len(frame))], frame["parameter"])
    ax.invert_yaxis()  # most important on top
    ax.set_xlabel(f"importance ({frame.attrs.get('method', 'Optuna')}, share of the total)")
    if len(objectives) > 1:
        ax.legend()
    save_figure(fig, path)
