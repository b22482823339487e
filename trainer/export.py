"""Consolidate a run's checkpoint into one safetensors file plus what is needed to use it.

`<run dir>/export/` (or a chosen directory) gets model.safetensors (float32 weights, from
every rank's ZeRO shards merged), model.json (model config, input spec, classes, features and
the dataset's transform with its training-split statistics), and the run's config.yaml.
DeepSpeed's shards are pickles, so they are read once here, from a checkpoint whose
checksums verify; everything downstream loads the safetensors file, which holds only tensors.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stoker.atomic import atomic_directory
from stoker.datasets.manifest import Manifest
from stoker.errors import UserError
from stoker.trainer import checkpoint_guard
from stoker.trainer import checkpoints as ckpt
from stoker.trainer.config import ModelConfig
from stoker.trainer.losses import class_weights, resolve_name
from stoker.trainer.models import InputSpec, build_model, spec_from_manifest
from stoker.trainer.ranking import pick_checkpoint
from stoker.trainer.run_dir import EXPORT_MODEL, EXPORT_WEIGHTS, Records
from stoker.trainer.run_spec import run_from_record
from stoker.trainer.targets import InOriginalUnits, TargetScale

WEIGHTS, MODEL_JSON = EXPORT_WEIGHTS, EXPORT_MODEL


def find_run(run: str, storage: str = "runs") -> Path:
    """A run given by name (under `storage`) or by its directory."""
    for candidate in (Path(run), Path(storage) / run):
        if Records(candidate).exists():
            return candidate.resolve()
    raise UserError(f"{run}: no run directory with that name under {storage}/ (and not a run directory)")


def best_epoch(run_dir: Path) -> int | None:
    """The epoch the run calls best: final_metrics.json's, or (a run still training or
    stopped) the one the latest checkpoint's state names."""
    final = Records(run_dir).final()
    if final:
        return final["best_epoch"]
    found = ckpt.local_checkpoints(run_dir)
    return (ckpt.read_state(found[0]).get("best") or {}).get("epoch") if found else None


def choose_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint of the best epoch (`which` "best") or the latest one
    (stoker.trainer.ranking.pick_checkpoint), verified and owned by this run."""
    found = [(c, ckpt.epoch_of(c)) for c in ckpt.local_checkpoints(run_dir)
             if which != "best" or not ckpt.is_partial(c)]
    chosen = pick_checkpoint(found, which, best_epoch(run_dir) if which == "best" and found else None, str(run_dir))
    problem = ckpt.verify(chosen)
    if problem:
        raise UserError(f"{chosen}: checkpoint is corrupt ({problem})")
    owner = ckpt.read_state(chosen).get("run")
    name = (Records(run_dir).config() or {}).get("name")
    if owner is not None and name is not None and owner != name:
        raise UserError(f"{chosen}: the checkpoint belongs to run {owner!r}, not to {name!r} (copied from another run?)")
    return chosen


def consolidated_state_dict(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full float32 weights from every rank's shards of one DeepSpeed checkpoint. Nothing is
    unpickled before stoker.trainer.checkpoint_guard has checked every pickle in it."""
    checkpoint_guard.check_checkpoint(checkpoint)
    if zero_stage == 0:
        # No ZeRO partitions: rank 0's model states hold the whole module; PyTorch's own
        # restricted unpickler reads them, with the guard's allow-list.
        with torch.serialization.safe_globals(checkpoint_guard.allowed_objects()):
            states = torch.load(checkpoint / ckpt.CHECKPOINT_TAG / "mp_rank_00_model_states.pt",
                                map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    # zero_to_fp32 unpickles without restriction (weights_only=False): checked above.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ckpt.CHECKPOINT_TAG)


def export_run(run_dir: Path, output: Path | None = None, which: str = "best") -> Path:
    records = Records(run_dir)
    config, dataset = records.config(), records.dataset()
    if config is None or dataset is None:
        raise UserError(f"{run_dir}: not a complete run directory (its config or dataset record is missing)")
    run = run_from_record(config, str(records.config_path()))  # validated once, read typed below
    manifest = Manifest.read(dataset["path"], run.data.s3)
    model_config, loss = run.model, run.train.loss
    spec = spec_from_manifest(manifest, resolve_name(loss, manifest.task))
    checkpoint = choose_checkpoint(run_dir, which)
    weights = consolidated_state_dict(checkpoint, run.train.deepspeed.zero_stage)
    model = build_model(model_config, spec)
    # strict: the checkpoint and the rebuilt architecture must agree on every tensor.
    model.load_state_dict(weights, strict=True)
    output = (output or records.export).resolve()
    with atomic_directory(output) as staging:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(staging / WEIGHTS))
        state = ckpt.read_state(checkpoint)
        (staging / MODEL_JSON).write_text(json.dumps({
            "run": run.name,
            "checkpoint": checkpoint.name,
            "epoch": state["epoch"],
            "model": model_config.model_dump(mode="json"),
            "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items() if k != "extra"},
            "task": manifest.task,
            "classes": manifest.classes,
            "features": manifest.features,
            "transform": manifest.transform,
            "source_fingerprint": manifest.source_fingerprint,
            # Regression: the network outputs standardised targets; load_exported scales back.
            "target_scale": dataset.get("target_scale"),
            # The training objective, so `stoker evaluate` reports the loss the run printed.
            "loss": {
                "name": resolve_name(loss, manifest.task),
                "label_smoothing": loss.label_smoothing,
                "huber_delta": loss.huber_delta,
                "class_weights": class_weights(loss, manifest.classes, manifest.splits["train"].get("class_counts"))
                if manifest.task == "classification" else None,
            },
        }, indent=2, default=str) + "\n")
        shutil.copy(records.config_path(), Records(staging).config_path())
    return output


def load_exported(directory: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported model (weights loaded from safetensors, eval mode) and its model.json."""
    meta_path = directory / MODEL_JSON
    if not meta_path.is_file():
        raise UserError(f"{directory}: not an exported model ({MODEL_JSON} missing); run `stoker export RUN` first")
    meta = json.loads(meta_path.read_text())
    spec = InputSpec(**{**meta["spec"], "input_shape": tuple(meta["spec"]["input_shape"])})
    model = build_model(ModelConfig.model_validate(meta["model"]), spec)
    model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=True)
    if meta.get("target_scale"):
        model = InOriginalUnits(model, TargetScale(**meta["target_scale"]))
    return model.eval(), meta
