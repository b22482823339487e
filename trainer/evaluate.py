"""Evaluate an exported model on a prepared dataset's split, in this process (no workers, no Ray)."""

from pathlib import Path
from typing import Any

import torch

from stoker.datasets.ingest import as_tensors, read_blocks, split_files
from stoker.datasets.manifest import Manifest
from stoker.errors import UserError
from stoker.trainer.config import LossConfig
from stoker.trainer.export import load_exported
from stoker.trainer.losses import build_loss


def check_compatible(meta: dict[str, Any], manifest: Manifest, data: Path) -> list[str]:
    """Refuse data the model cannot read; return warnings for data it reads differently."""
    if manifest.task != meta["task"]:
        raise UserError(f"--data: {data} was prepared for {manifest.task}; the model does {meta['task']}")
    if list(manifest.features) != list(meta["features"]):
        missing = sorted(set(meta["features"]) - set(manifest.features))
        detail = f"missing {missing[:3]}" if missing else "in a different order or with extra columns"
        raise UserError(f"--data: {data} has other feature columns than the model was trained on ({detail})")
    shape = list(getattr(manifest, "input_shape", None) or [len(manifest.features)])
    if shape != list(meta["spec"]["input_shape"]):
        raise UserError(f"--data: input shape {shape} of {data} differs from the model's {meta['spec']['input_shape']}")
    if meta["classes"] is not None and list(manifest.classes) != list(meta["classes"]):
        raise UserError(f"--data: {data} has classes {manifest.classes}; the model predicts {meta['classes']}")
    if manifest.transform != meta["transform"]:
        return [f"{data} was prepared with other transform statistics than the training data; "
                "metrics may suffer from the different scaling"]
    return []


def _training_loss(meta: dict[str, Any]) -> tuple[LossConfig, str, list[float] | None]:
    """The loss the run trained and reported with (class weights, smoothing, huber...)."""
    saved = meta.get("loss")
    if saved is None:  # exported before model.json recorded it: the task's plain loss
        name = "bce" if meta["spec"]["out_features"] == 1 and meta["task"] == "classification" else "auto"
        return LossConfig(name=name), meta["task"], None
    config = LossConfig(name=saved["name"], label_smoothing=saved["label_smoothing"], huber_delta=saved["huber_delta"])
    return config, meta["task"], saved["class_weights"]


def evaluate_export(export_dir: Path, data: str | Path, split: str = "test", batch_size: int = 256, s3=None) -> dict[str, Any]:
    from stoker.trainer.metrics import Evaluation

    model, meta = load_exported(export_dir)
    manifest = Manifest.read(data, s3, key="--data")
    if split not in manifest.splits:
        raise UserError(f"--split: {data} has no {split!r} split ({', '.join(manifest.splits)})")
    warnings = check_compatible(meta, manifest, data)
    device = torch.device("cpu")
    loss_fn = build_loss(*_training_loss(meta))
    evaluation = Evaluation(meta["task"], len(meta["classes"]) if meta["classes"] else None, device)
    evaluation.reset(with_details=True)
    # Read here with pyarrow, block by block in file order: no Ray cluster for an evaluation.
    paths, filesystem = split_files(data, split, manifest, s3)
    with torch.no_grad():
        for block in read_blocks(paths, filesystem, manifest.features, manifest.input_shape):
            inputs, labels = as_tensors(*block, device, torch.float32)
            for start in range(0, len(inputs), batch_size):
                x = inputs[start:start + batch_size]
                y = x if meta["task"] == "language_modeling" else labels[start:start + batch_size]
                out = model(x)
                evaluation.update(out, y, loss_fn(out, y), x)
    scalars, details = evaluation.compute()
    return {"model": str(export_dir), "data": str(data), "split": split, "rows": manifest.splits[split]["rows"],
            "metrics": scalars, "details": details, "warnings": warnings}
