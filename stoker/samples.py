"""`stoker data sample NAME OUTPUT`: the data each example needs, made from real data that
installed packages ship, so every example runs on a fresh clone without a download.

- tables (`digits`, `iris`, ...): scikit-learn's bundled datasets as CSV.
- `visits`: scikit-learn's diabetes study (442 real patients: age, BMI, disease progression)
  as a clinic's visit log for `examples/data-cleaning.yaml`: one to three visits per patient
  (a grouped split), height and weight whose ratio is the patient's real BMI, the study's
  blood pressure and two of its blood-serum tests (triglycerides, glucose), a city and an
  income, the outcome "progressed" for the worst tenth, and the flaws the example cleans
  (missing values per column, duplicated rows, numbers that do not parse).
- `digit-images`: scikit-learn's handwritten digits as PNG files, one folder per class, plus
  one file that does not decode (`examples/data-images.yaml` quarantines it).
- `docstrings`: a labelled text corpus for `examples/data-text.yaml`: the first paragraph of
  the documentation of every public function of numpy, pandas and Python's `os`/`pathlib`/
  `json`/`re`..., labelled with the library it documents, as JSON lines, plus one line that is
  not JSON (quarantined).

Every sample is generated with a fixed seed: the same bytes on every machine.
"""

import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stoker.atomic import atomic_directory, atomic_file
from stoker.errors import UserError

# Datasets that ship inside scikit-learn, written as CSV with the label column `target`.
TABLES = {
    "digits": "load_digits",
    "breast_cancer": "load_breast_cancer",
    "iris": "load_iris",
    "wine": "load_wine",
    "diabetes": "load_diabetes",
}
SEED = 0


def write_table(name: str, output: Path) -> str:
    import sklearn.datasets

    if output.suffix.lower() != ".csv":
        raise UserError(f"{output}: the sample is written as CSV; name the file *.csv")
    frame = getattr(sklearn.datasets, TABLES[name])(as_frame=True).frame
    with atomic_file(output) as tmp:
        frame.to_csv(tmp, index=False)
    return f"{len(frame)} rows, {frame.shape[1]} columns (label column: target)"


def visits_frame() -> pd.DataFrame:
    """The visit log, flaws included (see the module docstring)."""
    from sklearn.datasets import load_diabetes

    rng = np.random.default_rng(SEED)
    patients = load_diabetes(as_frame=True, scaled=False).frame
    progressed = patients["target"] > patients["target"].quantile(0.9)
    height = rng.normal(np.where(patients["sex"] == 1, 163, 177), 7).round(1)
    rows = []
    for index, patient in patients.iterrows():
        for visit in range(int(rng.integers(1, 4))):
            rows.append({
                "patient_id": f"p{index:04d}",
                "visit": visit,
                "age": int(patient["age"]),
                "height": float(height[index]),
                # The study's BMI, measured again at each visit with a little noise.
                "weight": round(float(patient["bmi"] * (height[index] / 100) ** 2 + rng.normal(0, 0.8)), 1),
                "blood_pressure": float(patient["bp"]),
                # The study's s5 is the log of the serum triglycerides; s6 the blood sugar.
                "triglycerides": round(float(np.exp(patient["s5"])), 1),
                "glucose": float(patient["s6"]),
                "income": round(float(rng.lognormal(10.5, 0.5)), -1),
                "city": str(rng.choice(["Leeds", "York", "Hull", "Bath"], p=[0.4, 0.3, 0.2, 0.1])),
                "outcome": "progressed" if progressed[index] else "stable",
            })
    frame = pd.DataFrame(rows)
    flaw = np.random.default_rng(SEED + 1)
    for column, fraction in (("age", 0.02), ("city", 0.05), ("income", 0.05), ("blood_pressure", 0.03)):
        frame.loc[flaw.random(len(frame)) < fraction, column] = None
    frame = frame.astype({"weight": object})
    frame.loc[flaw.choice(len(frame), 6, replace=False), "weight"] = "n/a kg"  # does not parse
    duplicates = frame.sample(12, random_state=SEED)
    return pd.concat([frame, duplicates], ignore_index=True)


def write_visits(output: Path) -> str:
    if output.suffix.lower() != ".csv":
        raise UserError(f"{output}: the sample is written as CSV; name the file *.csv")
    frame = visits_frame()
    with atomic_file(output) as tmp:
        frame.to_csv(tmp, index=False)
    counts = frame["outcome"].value_counts().to_dict()
    return f"{len(frame)} visits of {frame['patient_id'].nunique()} patients (label column: outcome, {counts})"


def write_digit_images(output: Path) -> str:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    with atomic_directory(output) as staging:
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            folder = staging / str(label)
            folder.mkdir(exist_ok=True)
            Image.fromarray((pixels * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{index:04d}.png")
        (staging / "0" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return f"{len(digits.images)} PNG images in 10 class folders, and one that does not decode"


# Libraries whose documentation makes the corpus, by label.
DOC_SOURCES: dict[str, Callable[[], list[object]]] = {
    "numpy": lambda: [getattr(np, n) for n in dir(np)] + [getattr(np.linalg, n) for n in dir(np.linalg)],
    "pandas": lambda: [getattr(pd, n) for n in dir(pd)] + [getattr(pd.DataFrame, n) for n in dir(pd.DataFrame)]
    + [getattr(pd.Series.str, n) for n in dir(pd.Series.str)],
    "stdlib": lambda: [getattr(m, n) for m in _stdlib_modules() for n in dir(m)],
}


def _stdlib_modules() -> list[object]:
    import collections
    import itertools
    import os
    import pathlib
    import shutil as shutil_module
    import statistics
    import string

    return [collections, itertools, os, os.path, pathlib.Path, shutil_module, statistics, string, json, re]


def docstring_records() -> dict[str, list[dict[str, str]]]:
    """Per library: one record per public documented callable, its first paragraph as text."""
    corpus: dict[str, list[dict[str, str]]] = {}
    for library, members in DOC_SOURCES.items():
        seen: set[str] = set()
        records = []
        for member in members():
            if not callable(member) or getattr(member, "__name__", "_").startswith("_"):
                continue
            doc = inspect.getdoc(member) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            # Signatures and one-word stubs say nothing a reader could classify.
            if len(first.split()) < 4 or first in seen:
                continue
            seen.add(first)
            records.append({"text": first, "library": library})
        corpus[library] = sorted(records, key=lambda r: r["text"])
    return corpus


def write_docstrings(output: Path) -> str:
    corpus = docstring_records()
    with atomic_directory(output) as staging:
        for library, records in corpus.items():
            lines = [json.dumps(r) for r in records]
            if library == "stdlib":
                lines.insert(len(lines) // 2, '{"text": "a record cut off half way')  # quarantined
            (staging / f"{library}.jsonl").write_text("\n".join(lines) + "\n")
    counts = {library: len(records) for library, records in corpus.items()}
    return f"{sum(counts.values())} documented functions as JSON lines {counts} (text column: text, label: library)"


# Each sample: (what it is, writer). A writer returns a one-line summary of what it wrote.
SAMPLES: dict[str, tuple[str, Callable[[Path], str]]] = {
    **{name: (f"scikit-learn's {name} dataset as CSV", lambda out, name=name: write_table(name, out)) for name in TABLES},
    "visits": ("a clinic's visit log with missing values, duplicates and bad numbers (examples/data-cleaning.yaml)", write_visits),
    "digit-images": ("handwritten digits as PNG folders per class (examples/data-images.yaml)", write_digit_images),
    "docstrings": ("library documentation labelled by library, as JSON lines (examples/data-text.yaml)", write_docstrings),
}
