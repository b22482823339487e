"""Transforms fit on the training split and applied to any split or to new data.

A fitted transform is a plain JSON-able dict saved in the manifest: numeric statistics
(imputation value, mean/std or min/max), categories per categorical column, the text vocabulary,
per-channel image statistics, and the derived-feature expressions. `apply_*` needs nothing else,
which is what `stoker data apply` relies on.
"""

import ast
import re
from collections import Counter

import numpy as np
import pandas as pd

from stoker.errors import UserError

# ---------------------------------------------------------------------------- derived features

_FUNCTIONS = {"log": np.log, "log1p": np.log1p, "exp": np.exp, "sqrt": np.sqrt, "abs": np.abs}
_BINARY = {
    ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.divide,
    ast.Pow: np.power, ast.Mod: np.mod,
}


def evaluate(name: str, expression: str, frame: pd.DataFrame) -> np.ndarray:
    """Evaluate an arithmetic expression over numeric columns, without `eval`.

    Only column names, numbers, + - * / ** %, unary minus and a few numpy functions are allowed,
    so a config file cannot run code.
    """
    where = f"data.derived.{name}"
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise UserError(f"{where}: invalid expression {expression!r}: {exc.msg}") from None

    def walk(node: ast.AST):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in frame.columns:
                raise UserError(f"{where}: column {node.id!r} is not in the data")
            values = pd.to_numeric(frame[node.id], errors="coerce")
            return values.to_numpy(dtype=np.float64, na_value=np.nan)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCTIONS and len(node.args) == 1 and not node.keywords):
            return _FUNCTIONS[node.func.id](walk(node.args[0]))
        raise UserError(
            f"{where}: {ast.unparse(node)!r} is not allowed; use columns, numbers, + - * / ** % "
            f"and {', '.join(_FUNCTIONS)}"
        )

    with np.errstate(all="ignore"):
        result = np.asarray(walk(tree), dtype=np.float64)
    if result.ndim == 0:
        result = np.full(len(frame), float(result))
    # inf from log(0) or x/0 is a missing value, which the missing-value policy then handles.
    result[~np.isfinite(result)] = np.nan
    return result


def add_derived(frame: pd.DataFrame, derived: dict[str, str]) -> pd.DataFrame:
    if not derived:
        return frame
    frame = frame.copy()
    for name, expression in derived.items():
        frame[name] = evaluate(name, expression, frame)
    return frame


# ----------------------------------------------------------------------------------- tabular


def fit_tabular(
    train: pd.DataFrame, numeric: list[str], categorical: list[str], policies: dict[str, str],
    fill_value: float | str, scale: str, encoding: str, derived: dict[str, str],
) -> dict:
    """Statistics of the training split that define the transform of every split."""
    numeric_stats = {}
    for column in numeric:
        values = train[column].astype("float64")
        present = values.notna().any()
        policy = policies[column]
        fill = {
            "drop": None,
            "mean": values.mean(),
            "median": values.median(),
            "mode": values.mode().iloc[0] if present else 0.0,
            "constant": fill_value,
        }[policy]
        if isinstance(fill, str):
            raise UserError(f"data.fill_value: {fill!r} is not a number, but column {column!r} is numeric")
        std = float(values.std(ddof=0)) if present else 0.0
        numeric_stats[column] = {
            "policy": policy,
            "mean": float(values.mean()) if present else 0.0,
            # A constant column would divide by zero; leaving it unscaled keeps it at 0.
            "std": std if std > 0 else 1.0,
            "min": float(values.min()) if present else None,
            "max": float(values.max()) if present else None,
            "fill": None if fill is None or pd.isna(fill) else float(fill),
        }
    categorical_stats = {}
    for column in categorical:
        values = train[column].astype("string")
        policy = policies[column]
        fill = None
        if policy == "mode" and values.notna().any():
            fill = str(values.mode().iloc[0])
        elif policy == "constant":
            fill = str(fill_value)
        categorical_stats[column] = {
            "policy": policy,
            "categories": sorted(values.dropna().unique().tolist()),
            "fill": fill,
        }
    return {"derived": dict(derived), "scale": scale, "encoding": encoding,
            "numeric": numeric_stats, "categorical": categorical_stats}


def apply_tabular(part: pd.DataFrame, transform: dict) -> dict[str, np.ndarray]:
    """Encode rows with the training statistics; unknown categories become all zeros (one-hot)
    or -1 (ordinal). Missing values left after imputation stay NaN only under `drop`, which has
    removed those rows already."""
    columns: dict[str, np.ndarray] = {}
    scale = transform.get("scale", "standard")
    numeric = transform["numeric"]
    if numeric:
        # One float64 block for every numeric column: a few array operations per batch
        # instead of a few pandas operations per column.
        block = part[list(numeric)]
        if not all(pd.api.types.is_numeric_dtype(t) for t in block.dtypes):
            block = block.apply(pd.to_numeric, errors="coerce")
        # Our own copy, so imputing and scaling work in place (two passes over the block
        # instead of a new array per step); the arithmetic is the same float64 as ever.
        matrix = block.to_numpy(dtype=np.float64, na_value=np.nan, copy=True).T
        stats = list(numeric.values())
        fills = np.array([np.nan if s["fill"] is None else s["fill"] for s in stats], dtype=np.float64)[:, None]
        gaps = np.isnan(matrix)
        if gaps.any():
            np.copyto(matrix, np.broadcast_to(fills, matrix.shape), where=gaps)
        if scale == "standard":
            matrix -= np.array([s["mean"] for s in stats])[:, None]
            matrix /= np.array([s["std"] for s in stats])[:, None]
        elif scale == "minmax":
            low = np.array([0.0 if s["min"] is None else s["min"] for s in stats])
            span = np.array([1.0 if s["min"] is None or s["max"] - s["min"] <= 0 else s["max"] - s["min"]
                             for s in stats])
            matrix -= low[:, None]
            matrix /= span[:, None]
        encoded = np.ascontiguousarray(matrix, dtype=np.float32)
        for index, column in enumerate(numeric):
            columns[column] = encoded[index]
    for column, stats in transform["categorical"].items():
        values = part[column].astype("string")
        if stats["fill"] is not None:
            values = values.fillna(stats["fill"])
        if transform.get("encoding", "onehot") == "ordinal":
            index = {c: i for i, c in enumerate(stats["categories"])}
            columns[column] = values.map(index).astype("float64").fillna(-1).to_numpy(np.float32)
        else:
            for category in stats["categories"]:
                columns[f"{column}={category}"] = (values == category).fillna(False).to_numpy(dtype=np.float32)
    return columns


# -------------------------------------------------------------------------------------- text

PAD, UNKNOWN = 0, 1
_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


def stop_word_set(stop_words) -> frozenset[str]:
    if stop_words == "none":
        return frozenset()
    if stop_words == "english":
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return frozenset(ENGLISH_STOP_WORDS)
    return frozenset(w.lower() for w in stop_words)


def clean_tokens(texts, options: dict) -> list[list[str]]:
    """Lower-case, strip punctuation, split on whitespace, drop stop words."""
    stops = frozenset(options["stop_words"])
    out = []
    for text in texts:
        text = "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text)
        if options["lowercase"]:
            text = text.lower()
        if options["strip_punctuation"]:
            text = _PUNCTUATION.sub(" ", text)
        out.append([t for t in text.split() if t not in stops])
    return out


def list_column(matrix: np.ndarray, value_type):
    """A [N, K] matrix as a list<value_type> Arrow column, without a per-row Python loop."""
    import pyarrow as pa

    n, k = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), type=value_type))


def text_options(text_config) -> dict:
    return {
        "column": text_config.column,
        "lowercase": text_config.lowercase,
        "strip_punctuation": text_config.strip_punctuation,
        "stop_words": sorted(stop_word_set(text_config.stop_words)),
        "max_length": text_config.max_length,
    }


def fit_text(train_texts, text_config) -> dict:
    options = text_options(text_config)
    counts = Counter(t for tokens in clean_tokens(train_texts, options) for t in tokens)
    return vocabulary_from(counts, options, text_config)


def vocabulary_from(counts: Counter, options: dict, text_config) -> dict:
    """The text transform from (merged) training token counts."""
    # Most frequent first, ties alphabetical, so the vocabulary is the same on every run.
    kept = sorted((t for t, n in counts.items() if n >= text_config.min_frequency), key=lambda t: (-counts[t], t))
    vocabulary = ["<pad>", "<unk>", *kept[: text_config.vocab_size - 2]]
    return {**options, "vocabulary": vocabulary}


def apply_text(texts, transform: dict) -> np.ndarray:
    """Token ids, int32 [N, max_length]: truncated, padded with 0, unknown tokens 1."""
    index = {t: i for i, t in enumerate(transform["vocabulary"])}
    length = transform["max_length"]
    ids = np.zeros((len(texts), length), dtype=np.int32)
    for row, tokens in enumerate(clean_tokens(texts, transform)):
        encoded = [index.get(t, UNKNOWN) for t in tokens[:length]]
        ids[row, : len(encoded)] = encoded
    return ids


# ------------------------------------------------------------------------------------ images


def fit_image(train_pixels: np.ndarray) -> dict:
    """Per-channel mean and std of the training images, on the [0, 1] scale."""
    scaled = train_pixels.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    std[std == 0] = 1.0
    return {"mean": mean.tolist(), "std": std.tolist(), "shape": list(train_pixels.shape[1:])}


def apply_image(pixels: np.ndarray, transform: dict) -> np.ndarray:
    """float32 [N, C*H*W]: scaled to [0, 1], then standardised per channel."""
    mean = np.asarray(transform["mean"], np.float32)[None, :, None, None]
    std = np.asarray(transform["std"], np.float32)[None, :, None, None]
    normalised = (pixels.astype(np.float32) / 255.0 - mean) / std
    return normalised.reshape(len(pixels), -1)
