"""report.html and its PNGs from a run's history and best-epoch details."""

from PIL import Image

from stoker.trainer.report import write_page, write_report


def test_report_shows_curves_confusion_worst_classes_and_wrong_examples(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1), "val_accuracy": 0.5 + e / 10}
               for e in range(3)]
    details = {
        "precision_per_class": [0.9, 0.2, 0.8],
        "recall_per_class": [0.95, 0.3, 0.7],
        "f1_per_class": [0.92, 0.24, 0.75],
        "support_per_class": [10, 5, 8],
        "confusion_matrix": [[9, 1, 0], [3, 1, 1], [0, 2, 6]],
        "worst_examples": [{"confidence": 0.97, "predicted": 0, "true": 1, "inputs": [0.5, 1.5]}],
    }
    best = {"epoch": 2, "score": 0.7, "test": {"accuracy": 0.69, "f1": 0.64}, "test_details": details}
    page = write_report(tmp_path, "demo", "accuracy", history, best, ["cat", "dog", "eel"]).read_text()
    for png in ("learning_curves.png", "confusion_matrix.png", "per_class.png"):
        assert f"src='{png}'" in page
        assert Image.open(tmp_path / png).size[0] > 100
    worst = page.split("Worst classes")[1].split("</table>")[0]
    # dog has the lowest F1, so it leads the worst-classes table.
    assert worst.index("<td>dog</td>") < worst.index("<td>eel</td>") < worst.index("<td>cat</td>")
    wrong = page.split("Most confidently wrong")[1]
    assert "<td>0.9700</td><td>cat</td><td>dog</td>" in wrong
    assert not list(tmp_path.glob(".*tmp*"))


def test_every_report_page_is_one_skeleton_with_an_escaped_title_and_its_own_style(tmp_path):
    path = write_page(tmp_path / "report.html", "a<b", "<h1>x</h1>", "td{padding:0}")
    assert path.read_text() == (
        "<!doctype html><html><head><meta charset='utf-8'><title>a&lt;b</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:0}</style></head>"
        "<body><h1>x</h1></body></html>\n")
