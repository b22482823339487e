"""A scratch project for the whole-run benchmarks: scikit-learn's digits as `digits.csv` in a
`project/` folder under a fresh temporary root (short path: Ray's socket paths have a limit)."""

import tempfile
from pathlib import Path


def digits_project(prefix: str) -> tuple[Path, Path]:
    """(root, project): a new temporary root and its `project/` holding digits.csv."""
    from sklearn.datasets import load_digits

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    project = root / "project"
    project.mkdir()
    load_digits(as_frame=True).frame.to_csv(project / "digits.csv", index=False)
    return root, project
