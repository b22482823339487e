"""Model quality: every built-in model family against the classical baseline of its modality,
fitted on exactly the same prepared splits in the same run.

- tabular (mlp, README-style config) on every classification and regression dataset bundled
  with scikit-learn (iris, wine, breast_cancer, digits; diabetes): test accuracy against
  LogisticRegression, test R2 against Ridge; and examples/data-cleaning.yaml as shipped (the
  visit log, a tenth of it the minority class, balanced re-sampling) against LogisticRegression
  with and without balanced class weights, the better of the two: test ROC AUC, the measure that
  a re-sampling, which moves the decision threshold, does not tilt.
- image: examples/data-images.yaml as shipped (cnn on the digit images) against
  LogisticRegression on the same prepared pixels: test accuracy.
- text: examples/data-text.yaml as shipped (gru), and the same run with lstm and transformer,
  against TF-IDF + LogisticRegression on the same token ids: test accuracy.
- language_modeling: examples/data-lm.yaml as shipped (gpt, one worker) against an
  add-one-smoothed bigram model of the same training tokens: validation perplexity (the ratio
  is the bigram's over gpt's, so higher is better, like the others); and its training tokens/s
  against a plain PyTorch loop of the same model, loss, optimizer and batches in memory, in a
  Ray task with the worker's one CPU: the tokens each side trained over its pass's seconds (the
  plain loop drops the short last batch, stoker trains it), each side's median epoch after the
  first, the plain loop run before and after stoker (its epochs pooled). A median, not the
  fastest epoch: the plain side has twice the epochs, and on a machine shared with other work
  the fastest of more samples is the luckier one; the median does not grow with the count.

stoker's figure is the run's reported metric of its best epoch. Prints one JSON line: {"cases":
[{case, model, stoker, baseline, ratio}], "<modality>.<dataset>.ratio" per case (the lowest over
a dataset's models, each model's also as "<modality>.<dataset>.<model>.ratio"), "min_ratio",
"gpt.tokens_per_s_ratio", ...}. `--cases image,text` (or dataset names such as iris) runs a subset.
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
DATASETS = {"iris": "classification", "wine": "classification", "breast_cancer": "classification",
            "digits": "classification", "diabetes": "regression"}
TEXT_MODELS = {  # the text example's model, swapped for each family at a similar size
    "gru": None,
    "lstm": {"name": "lstm", "embed_dim": 64, "hidden_size": 64, "num_layers": 1, "bidirectional": True,
             "dropout": 0.3},
    "transformer": {"name": "transformer", "embed_dim": 64, "num_heads": 4, "num_layers": 2, "dropout": 0.3},
}
CASES = ["tabular", "image", "text", "language_modeling"]


def split_arrays(prepared: str, split: str):
    """(x, y) of a prepared split: feature columns, or the one `features` list column (image
    pixels, token ids); y is None for language modelling."""
    import pyarrow.parquet as pq

    from stoker.datasets.manifest import FEATURES_COLUMN, LABEL_COLUMN, Manifest

    manifest = Manifest.read(prepared)
    table = pq.read_table([f"{prepared}/{name}" for name in manifest.splits[split]["files"]])
    if manifest.features == [FEATURES_COLUMN]:
        x = np.stack(table[FEATURES_COLUMN].to_numpy(zero_copy_only=False))
    else:
        x = np.stack([table[f].to_numpy() for f in manifest.features], axis=1).astype(np.float64)
    return x, (table[LABEL_COLUMN].to_numpy() if LABEL_COLUMN in table.column_names else None)


def baseline(prepared: str, task: str) -> float:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import accuracy_score, r2_score

    x, y = split_arrays(prepared, "train")
    xt, yt = split_arrays(prepared, "test")
    if task == "classification":
        return float(accuracy_score(yt, LogisticRegression(max_iter=5000).fit(x, y).predict(xt)))
    return float(r2_score(yt, Ridge().fit(x, y).predict(xt)))


def roc_auc_baseline(prepared: str) -> float:
    """Binary test ROC AUC of logistic regression, the better of unweighted and balanced."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x, y = split_arrays(prepared, "train")
    xt, yt = split_arrays(prepared, "test")
    return max(float(roc_auc_score(yt, LogisticRegression(max_iter=5000, class_weight=weights).fit(x, y)
                                   .predict_proba(xt)[:, 1]))
               for weights in (None, "balanced"))


def tfidf_baseline(prepared: str) -> float:
    """TF-IDF + logistic regression on the token ids the text models read (padding dropped)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    from stoker.datasets.transform import PAD

    def docs(ids: np.ndarray) -> list[str]:
        return [" ".join(str(i) for i in row if i != PAD) for row in ids]

    x, y = split_arrays(prepared, "train")
    xt, yt = split_arrays(prepared, "test")
    tfidf = TfidfVectorizer(token_pattern=r"\S+")
    model = LogisticRegression(max_iter=5000).fit(tfidf.fit_transform(docs(x)), y)
    return float(accuracy_score(yt, model.predict(tfidf.transform(docs(xt)))))


def bigram_perplexity(prepared: str, vocab: int) -> float:
    """Validation perplexity of an add-one-smoothed bigram model of the training tokens, over
    the targets stoker scores: every token after the first of a row, padding excluded."""
    from stoker.datasets.transform import PAD

    def pairs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prev, nxt = ids[:, :-1].reshape(-1).astype(np.int64), ids[:, 1:].reshape(-1).astype(np.int64)
        keep = nxt != PAD
        return prev[keep], nxt[keep]

    prev, nxt = pairs(split_arrays(prepared, "train")[0])
    counts = np.ones((vocab, vocab))
    np.add.at(counts, (prev, nxt), 1)
    log_p = np.log(counts / counts.sum(axis=1, keepdims=True))
    prev, nxt = pairs(split_arrays(prepared, "validation")[0])
    return float(np.exp(-log_p[prev, nxt].mean()))


def plain_tokens_per_s(run, epochs: int) -> list[float]:
    """Training tokens/s of each epoch after the first (which warms up, as stoker's) of the same
    model, loss, optimizer and batch size as a plain PyTorch loop over the training split in
    memory, in a Ray task with a one-CPU worker's resources."""
    import ray

    x = split_arrays(run.data.output, "train")[0].astype(np.int64)

    @ray.remote(num_cpus=1)
    def loop(x: np.ndarray) -> float:
        import torch

        from stoker.datasets.manifest import Manifest
        from stoker.trainer.losses import build_loss
        from stoker.trainer.models import build_model, spec_from_manifest

        torch.manual_seed(0)
        spec = spec_from_manifest(Manifest.read(run.data.output))
        model = build_model(run.model, spec).train()
        loss_fn = build_loss(run.train.loss, spec.task, None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=run.train.optimizer.lr)
        tokens, batch = torch.from_numpy(x), run.train.batch_size
        rates = []
        for _ in range(epochs):
            started = time.perf_counter()
            for start in range(0, len(tokens) - batch + 1, batch):  # full batches
                rows = tokens[start:start + batch]
                loss = loss_fn(model(rows), rows)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            rates.append((len(tokens) // batch) * batch * tokens.shape[1] / (time.perf_counter() - started))
        return rates[1:]

    return ray.get(loop.remote(x))


def example_config(name: str, root: Path, model: dict | None = None) -> dict:
    """An example's config as shipped, with its data, output and runs under `root`."""
    config = yaml.safe_load((REPO / "examples" / name).read_text())
    config["data"]["source"] = str(root / config["data"]["source"])
    config["data"]["output"] = str(root / config["data"]["output"])
    config["storage"] = str(root / "runs")
    if model is not None:
        config["model"] = model
        config["name"] = f"{config['name']}-{model['name']}"
    return config


def sample(name: str, output: Path) -> None:
    from stoker.samples import SAMPLES

    if not output.exists():
        SAMPLES[name][1](output)


def prepare_case(config: dict):
    from stoker.config import parse_config
    from stoker.datasets.prepare import prepare

    run = parse_config(config, "quality")
    if not Path(run.data.output, "manifest.json").exists():
        prepare(run.data)
    return run


def run_case(config: dict):
    from stoker.trainer.run import train

    run = prepare_case(config)
    return run, train(run)


def row(case: str, model: str, stoker: float, base: float, **extra) -> dict:
    return {"case": case, "model": model, "stoker": round(stoker, 4), "baseline": round(base, 4),
            "ratio": round(stoker / base, 3) if base else None, **extra}


def tabular_cases(names: list[str], root: Path, epochs: int) -> list[dict]:
    import sklearn.datasets

    rows = []
    for name in names:
        task = DATASETS[name]
        raw = root / f"{name}.csv"
        getattr(sklearn.datasets, f"load_{name}")(as_frame=True).frame.to_csv(raw, index=False)
        config = {
            "name": name, "storage": str(root / "runs"),
            "data": {"source": str(raw), "label": "target", "task": task, "output": str(root / "prepared" / name),
                     "split": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 0,
                               "stratify": task == "classification"}},
            "model": {"name": "mlp", "hidden": [128, 64], "dropout": 0.1},
            "train": {"epochs": epochs, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.003},
                      "schedule": {"name": "warmup_cosine", "warmup_steps": 20},
                      "deepspeed": {"zero_stage": 2}, "checkpoint": {"every": 10}},
            "scaling": {"num_workers": 2},
        }
        run, result = run_case(config)
        score = result.test["accuracy" if task == "classification" else "r2"]
        rows.append(row(f"tabular.{name}", "mlp", score, baseline(run.data.output, task)))
    return rows


def cleaning_case(root: Path) -> list[dict]:
    sample("visits", root / "data" / "visits.csv")
    run, result = run_case(example_config("data-cleaning.yaml", root))
    return [row("tabular.visits", run.model.name, result.test["roc_auc"], roc_auc_baseline(run.data.output),
                metric="test roc_auc")]


def image_case(root: Path) -> list[dict]:
    sample("digit-images", root / "data" / "images")
    run, result = run_case(example_config("data-images.yaml", root))
    return [row("image.digits", run.model.name, result.test["accuracy"], baseline(run.data.output, "classification"))]


def text_cases(root: Path) -> list[dict]:
    sample("docstrings", root / "data" / "docs")
    rows = []
    for family, model in TEXT_MODELS.items():
        run, result = run_case(example_config("data-text.yaml", root, model))
        rows.append(row("text.docstrings", family, result.test["accuracy"], tfidf_baseline(run.data.output)))
    return rows


def language_model_case(root: Path) -> tuple[list[dict], dict]:
    from stoker.datasets.manifest import Manifest
    from stoker.trainer.run_dir import Records

    sample("docstrings", root / "data" / "docs")
    config = example_config("data-lm.yaml", root)
    run = prepare_case(config)
    plain_before = plain_tokens_per_s(run, run.train.epochs)
    run, result = run_case(config)
    bigram = bigram_perplexity(run.data.output, Manifest.read(run.data.output).vocab_size)
    perplexity = result.validation["perplexity"]
    # The median epoch after the first (the first pays the worker's warm-up): the tokens each
    # side trained over the pass's seconds. stoker trains every row (Ray gives each rank
    # rows // world_size; the last batch is short), so its rows over the pass, not its
    # samples_per_s, which counts the short batch as a whole one (800 rows for 777 here).
    rows, length = split_arrays(run.data.output, "train")[0].shape
    per_epoch = [(rows // r["world_size"]) * r["world_size"] * length / r["epoch_time_s"]
                 for r in Records(result.run_dir).metrics() if "epoch_time_s" in r][1:]
    stoker_tps = float(np.median(per_epoch))
    plain_after = plain_tokens_per_s(run, run.train.epochs)
    plain_tps = float(np.median(plain_before + plain_after))
    # Each plain run's own median too: far apart, the machine's load moved during the case.
    speed = {"gpt.tokens_per_s": round(stoker_tps), "gpt.plain_tokens_per_s": round(plain_tps),
             "gpt.plain_tokens_per_s_before_after": [round(float(np.median(r))) for r in (plain_before, plain_after)],
             "gpt.tokens_per_s_ratio": round(stoker_tps / plain_tps, 3)}
    # Perplexity: lower is better, so the ratio is the bigram's over gpt's.
    case = row("language_modeling.docstrings", "gpt", bigram, perplexity)
    case.update({"stoker": round(perplexity, 3), "baseline": round(bigram, 3), "metric": "validation perplexity"})
    return [case], speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="tabular cases' epochs (the examples keep their own)")
    parser.add_argument("--cases", "--datasets", default=",".join(CASES),
                        help="modalities (tabular, image, text, language_modeling) or tabular dataset names")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from stoker.cluster.connect import connect_embedded

    chosen = args.cases.split(",")
    unknown = [c for c in chosen if c not in CASES and c not in DATASETS and c != "visits"]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {CASES + list(DATASETS) + ['visits']}")
    tabular = list(DATASETS) if "tabular" in chosen else [c for c in chosen if c in DATASETS]
    root = Path(tempfile.mkdtemp(prefix="stkq", dir="/tmp"))
    connect_embedded(num_cpus=2)
    rows, extra, started = [], {}, time.perf_counter()
    try:
        rows += tabular_cases(tabular, root, args.epochs)
        if "tabular" in chosen or "visits" in chosen:
            rows += cleaning_case(root)
        if "image" in chosen:
            rows += image_case(root)
        if "text" in chosen:
            rows += text_cases(root)
        if "language_modeling" in chosen:
            lm_rows, extra = language_model_case(root)
            rows += lm_rows
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    keys: dict[str, float] = {}
    for r in rows:
        if r["ratio"] is None:
            continue
        keys[f"{r['case']}.ratio"] = min(keys.get(f"{r['case']}.ratio", r["ratio"]), r["ratio"])
        if r["case"].startswith("text."):
            keys[f"{r['case']}.{r['model']}.ratio"] = r["ratio"]
    print(json.dumps({"cases": rows, **keys, "min_ratio": min(r["ratio"] for r in rows if r["ratio"] is not None),
                      **extra, "tabular_epochs": args.epochs, "seconds": round(time.perf_counter() - started)}))


if __name__ == "__main__":
    main()
