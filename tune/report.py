"""report.html with PNG plots: the metric in trial order (is the searcher improving?), every
trial's learning curve (early-stopped ones visibly cut short) and a parallel-coordinates plot of
the hyperparameters coloured by the metric."""

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from stoker.trainer.report import save_figure, write_page  # noqa: E402
from stoker.tune.results import best_row  # noqa: E402

TOP_TRIALS = 200
"""A larger search's report draws the curves of, and lists, its best TOP_TRIALS trials."""
PARAMS_SKIP = {"trial", "order", "epochs", "status", "time_s", "pareto", "front"}


def plot_metric_by_order(table: pd.DataFrame, metric: str, mode: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    scored = table[table[metric].notna()]
    ax.scatter(scored["order"], scored[metric], s=18, label="trial (best epoch)")
    running = scored[metric].cummax() if mode == "max" else scored[metric].cummin()
    ax.step(scored["order"], running, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial (in the order the searcher proposed it)")
    ax.set_ylabel(metric)
    ax.legend()
    save_figure(fig, path)


def plot_learning_curves(curves: dict[str, list[tuple[int, float]]], table: pd.DataFrame, metric: str, mode: str,
                         path: Path, top: int = TOP_TRIALS) -> list[str]:
    """Every trial's curve, or in a larger search the `top` best trials' (thousands of lines
    are one blot, and slow to draw); the trials drawn."""
    fig, ax = plt.subplots(figsize=(7, 4))
    status = dict(zip(table["trial"], table["status"], strict=True))
    shown = table
    if len(table) > top:
        shown = table[table[metric].notna()].sort_values(metric, ascending=mode == "min", kind="stable").head(top)
        ax.set_title(f"the best {len(shown)} of {len(table)} trials")
    labelled, drawn = set(), []
    for trial in shown["trial"]:
        if not curves.get(trial):
            continue
        drawn.append(trial)
        epochs, values = zip(*curves[trial], strict=True)
        kind = status.get(trial, "completed")
        style = {"stopped": dict(color="0.6", linestyle="--", marker="x", markevery=[-1]),
                 "error": dict(color="C3", linestyle=":")}.get(kind, dict(color="C0"))
        ax.plot(epochs, values, linewidth=1, alpha=0.8, label=None if kind in labelled else kind, **style)
        labelled.add(kind)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if labelled:
        ax.legend()
    save_figure(fig, path)
    return drawn


def plot_parallel_coordinates(table: pd.DataFrame, metric: str, params: list[str], path: Path) -> None:
    scored = table[table[metric].notna()]
    columns = [*params, metric]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(columns)), 4))
    scaled = pd.DataFrame(index=scored.index)
    for column in columns:
        values = scored[column]
        if not pd.api.types.is_numeric_dtype(values):
            values = values.astype(str).astype("category").cat.codes.astype(float)
        low, high = float(values.min()), float(values.max())
        scaled[column] = (values - low) / (high - low) if high > low else 0.5
    # One collection, not a line per trial: ten thousand trials draw in well under a second.
    lines = [list(zip(range(len(columns)), row, strict=True)) for row in scaled[columns].to_numpy()]
    ax.add_collection(LineCollection(lines, colors=plt.cm.viridis(scaled[metric].to_numpy()), alpha=0.7))
    ax.set_xlim(-0.1, len(columns) - 0.9)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    ax.set_yticks([0, 1], ["low", "high"])
    ax.set_title(f"hyperparameters vs {metric} (colour: {metric})")
    save_figure(fig, path)


def trials_html(table: pd.DataFrame, metric: str, mode: str, top: int = TOP_TRIALS) -> str:
    """The trials table, or in a larger search its `top` best rows (the whole table is
    results.csv; a page of 10,000 rows is slow to write and to open)."""
    note = ""
    if len(table) > top:
        table = table[table[metric].notna()].sort_values(metric, ascending=mode == "min", kind="stable").head(top)
        note = f"<p>The best {len(table)} trials; every trial is in results.csv and results.parquet.</p>"
    return note + table.to_html(index=False, float_format=lambda v: f"{v:.6g}", na_rep="-")


def write_report(curves: dict[str, list[tuple[int, float]]], table: pd.DataFrame, metric: str, mode: str,
                 directory: Path, sections: list[str] = ()) -> Path:
    """`curves`: each trial's metric by epoch (`stoker.tune.search_log.curves_of`). `sections`:
    more HTML after the plots (importance, Pareto front), each with its heading."""
    plots = directory / "plots"
    plots.mkdir(exist_ok=True)
    params = [c for c in table.columns if c not in PARAMS_SKIP and c != metric and not c.startswith("last_")]
    images = []
    if len(table):
        plot_metric_by_order(table, metric, mode, plots / "metric_by_trial.png")
        plot_learning_curves(curves, table, metric, mode, plots / "learning_curves.png")
        plot_parallel_coordinates(table, metric, params, plots / "parameters.png")
        images = ["metric_by_trial.png", "learning_curves.png", "parameters.png"]
    best = best_row(table, metric, mode)
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    best_line = (f"best {html.escape(metric)} {best[metric]:.6g}: trial {html.escape(str(best['trial']))} "
                 f"(config: best.yaml)" if best is not None else "no trial reported the metric")
    body = "\n".join(
        [f"<h1>Search {html.escape(directory.name)}</h1>",
         f"<p>{len(table)} trials: {html.escape(summary)}. {best_line}</p>",
         *(f'<h2>{html.escape(name[:-4].replace("_", " "))}</h2><img src="plots/{name}">' for name in images),
         *sections,
         "<h2>Trials</h2>", trials_html(table, metric, mode)])
    css = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}"
    return write_page(directory / "report.html", directory.name, body, css)

