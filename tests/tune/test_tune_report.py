"""The search's report.html: the shared page skeleton and figure writer (trainer.report), and
its best line by the one "is better" (the lowest loss here)."""

import pandas as pd
from PIL import Image

from stoker.tune.report import write_report


def test_search_report_has_its_plots_the_best_trial_and_the_shared_skeleton(tmp_path):
    table = pd.DataFrame({"trial": ["t<1", "t2", "t3"], "order": [0, 1, 2], "val_loss": [0.5, 0.3, 0.3],
                          "status": ["completed"] * 3, "epochs": [1, 1, 1], "train.lr": [0.1, 0.01, 0.02]})
    page = write_report({}, table, "val_loss", "min", tmp_path).read_text()
    for name in ("metric_by_trial.png", "learning_curves.png", "parameters.png"):
        assert Image.open(tmp_path / "plots" / name).size[0] > 100
        assert f'src="plots/{name}"' in page
    assert "best val_loss 0.3: trial t2 " in page  # the first of the equal best
    assert page.startswith(f"<!doctype html><html><head><meta charset='utf-8'><title>{tmp_path.name}</title>")
    assert "font-size:12px" in page and "t&lt;1" in page
