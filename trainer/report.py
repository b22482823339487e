"""report.html and its PNGs: learning curves, confusion matrix, per-class precision/recall,
the worst classes and the most confidently wrong test examples of the best epoch."""

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from stoker.atomic import atomic_file, write_text  # noqa: E402
from stoker.trainer.run_dir import Records  # noqa: E402

WORST_CLASSES = 5
PAGE_CSS = "body{font-family:sans-serif;margin:2em}"
"""The style every report page starts from (`write_page`)."""


def save_figure(fig, path: Path) -> str:
    """Write `fig` as the PNG `path` (atomically) and close it; the file's name, for the page."""
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def learning_curves(history: list[dict[str, Any]], metric: str, directory: Path) -> str:
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    left.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="validation loss")
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    right.plot(epochs, [r.get(f"val_{metric}") for r in history], marker="o", color="tab:green")
    right.set_xlabel("epoch")
    right.set_title(f"validation {metric}")
    return save_figure(fig, directory / "learning_curves.png")


def confusion_matrix(matrix: list[list[int]], classes: list[str], directory: Path) -> str:
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > peak / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("test confusion matrix")
    return save_figure(fig, directory / "confusion_matrix.png")


def per_class(details: dict[str, Any], classes: list[str], directory: Path) -> str:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(classes) + 2), 3.6))
    positions = range(len(classes))
    ax.bar([p - 0.2 for p in positions], details["precision_per_class"], width=0.4, label="precision")
    ax.bar([p + 0.2 for p in positions], details["recall_per_class"], width=0.4, label="recall")
    ax.set_xticks(list(positions), classes, rotation=90)
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("test precision / recall per class")
    return save_figure(fig, directory / "per_class.png")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def write_report(run_dir: Path, name: str, metric: str, history: list[dict[str, Any]],
                 best: dict[str, Any], classes: list | None) -> Path:
    """Write `report.html` and its PNGs into `run_dir`; returns the HTML path."""
    parts = [f"<h1>stoker run {html.escape(name)}</h1>",
             f"<p>best epoch {best['epoch']} by validation {html.escape(metric)} = {best['score']:.4f}"
             + (f" (validation loss {best['loss']:.4f}; on an equal {html.escape(metric)} the lower loss wins)"
                if "loss" in best else "") + "; its checkpoint is the one export and the registry take</p>"]
    parts.append("<h2>Test metrics (best epoch)</h2>" + _table(["metric", "value"], [[k, v] for k, v in best["test"].items()]))
    if history:
        parts.append(f"<h2>Learning curves</h2><img src='{learning_curves(history, metric, run_dir)}'>")
    details = best.get("test_details") or {}
    if classes and details.get("confusion_matrix"):
        labels = [str(c) for c in classes]
        parts.append(f"<h2>Confusion matrix</h2><img src='{confusion_matrix(details['confusion_matrix'], labels, run_dir)}'>")
        parts.append(f"<h2>Per class</h2><img src='{per_class(details, labels, run_dir)}'>")
        rows = [
            [label, details["precision_per_class"][i], details["recall_per_class"][i],
             details["f1_per_class"][i], int(details["support_per_class"][i])]
            for i, label in enumerate(labels)
        ]
        parts.append(_table(["class", "precision", "recall", "f1", "support"], rows))
        worst = sorted(rows, key=lambda r: (r[3], r[0]))[:WORST_CLASSES]
        parts.append("<h2>Worst classes (lowest F1)</h2>" + _table(["class", "precision", "recall", "f1", "support"], worst))
        wrong = [
            [round(w["confidence"], 4), labels[w["predicted"]], labels[w["true"]], [round(v, 3) for v in w["inputs"]]]
            for w in details.get("worst_examples", [])
        ]
        parts.append("<h2>Most confidently wrong test examples</h2>"
                     + _table(["confidence", "predicted", "true", "inputs (first 16 values)"], wrong))
    css = ("table{border-collapse:collapse;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}")
    return write_page(Records(run_dir).report, name, "".join(parts), css)


def write_page(path: Path, title: str, body: str, css: str = "") -> Path:
    """Write one self-contained report page (the run's and the search's): `title` is escaped
    here, `body` is HTML, `css` is added to the shared base style."""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_CSS}{css}</style></head><body>{body}</body></html>\n")
    write_text(path, page)
    return path
