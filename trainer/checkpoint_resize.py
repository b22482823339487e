"""Resume a checkpoint at another world size or ZeRO stage: consolidate it, then load it.

DeepSpeed 0.19.8 refuses a ZeRO 1-3 checkpoint at another data-parallel world size ("The
checkpoint being loaded used a DP world size of 2 but the current world size is 1") and any
checkpoint at another stage (each stage writes its own files). A ZeRO-0 checkpoint is already
world-size independent (one `mp_rank_00_model_states.pt` with the whole module and the whole
torch optimizer state) and loads at any world size as it is.

Why not DeepSpeed's universal checkpoint (`ds_to_universal` + `checkpoint.load_universal`):
its converter and its ZeRO-3 loader hard-code Adam's `exp_avg`/`exp_avg_sq` (stoker also
configures SGD and RMSprop), its `zero/optimizer_state.pt` has one layout per source stage that
the other stages' loaders do not read (so ZeRO 1 -> 3 fails), ZeRO-0 is neither a source nor a
target, and the converter is a multi-process offline tool. stoker's consolidation is small
instead, and exact by construction (slices and copies, no arithmetic):

- `consolidate` reads the N shards (each through stoker.trainer.checkpoint_guard, then
  `torch.load(weights_only=True)` under the same allow-list) and joins every parameter's fp32
  master weights and optimizer state (every per-element tensor: `exp_avg`, `exp_avg_sq`,
  `momentum_buffer`, `square_avg`, ...) back to the parameter's full shape, plus the shared
  `step`, the optimizer's hyperparameters, the module's buffers, DeepSpeed's counters and the
  learning-rate scheduler's state. The layouts are DeepSpeed's own (ZeRO 1/2: each rank's
  `param_slice_mappings` fragments of a flat partition; ZeRO 3: every parameter padded to
  ceil(numel / N) per rank; ZeRO-0 and bf16 without ZeRO: as ZeRO 1).
- `prepare` (the driver, before the workers start) checks that the checkpoint converts and
  records it beside the original, `<checkpoint>/consolidated/` (`write`: what it was
  converted from, the parameters, the checkpoint's stamp; checksummed, written whole or not
  at all); each worker then joins what it loads from the original shards (`resume_state`).
- `load` puts it into the new engine through DeepSpeed's public per-parameter API
  (`deepspeed.utils.safe_set_full_fp32_param` / `safe_set_full_optimizer_state`, which
  partition a full tensor for this rank at any stage) or, for an unpartitioned engine (ZeRO-0
  in fp32), the torch optimizer's own `load_state_dict`.

The driver converts while the workers wait, so its part is kept well under the cost of the
save it converts (benchmarks/elastic.py `--convert`): the shards are memory-mapped, not read
into memory, and the driver reads only where each parameter's fragments lie (views; nothing
is joined or copied there). An earlier version wrote a second copy of every fragment for the
workers to read; they joined it just as they join the shards' own, so the copy cost the
driver a write of the whole checkpoint (1.4-2.2x the save) and bought nothing.
"""

import json
import math
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stoker.trainer import checkpoint_guard as guard
from stoker.trainer.checkpoints import CHECKPOINT_TAG as _TAG
from stoker.trainer.checkpoints import CONVERTED, check_sums
from stoker.trainer.checkpoints import CONVERTED_SUMS as _SUMS
from stoker.trainer.checkpoints import STATE_FILE as _STATE
from stoker.trainer.checkpoints import sha256 as _sha256

_META = "meta.json"
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$")


class ConversionError(Exception):
    """A checkpoint that cannot be consolidated (missing shards, an unknown layout)."""


class ModelMismatch(Exception):
    """The engine's parameters are not the checkpoint's (names or shapes differ)."""


@dataclass
class Consolidated:
    """A checkpoint's training state, independent of world size and ZeRO stage."""

    params: dict[str, torch.Tensor]
    """Full fp32 master weights, by parameter name."""
    state: dict[str, dict[str, torch.Tensor]]
    """Per parameter: each per-element optimizer state tensor at the parameter's full shape."""
    scalars: dict[str, Any] = field(default_factory=dict)
    """Optimizer state shared by every element (Adam's `step`)."""
    hyper: list[dict[str, Any]] = field(default_factory=list)
    """The optimizer's param groups without their parameters (lr, betas, weight decay...)."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed's counters (global_steps, global_samples, skipped_steps) and the scheduler."""
    source: dict[str, int] = field(default_factory=dict)
    """The checkpoint's world size and ZeRO stage."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    """From `consolidate(join=False)`, instead of `params` and `state` (empty then): each
    parameter's fp32 weights (key "fp32") and per-element state as its fragments in order,
    views into the mapped shards (nothing copied); `write` writes them so, `read` joins them."""
    shapes: dict[str, list[int]] = field(default_factory=dict)
    """Each parameter's full shape, with `pieces`."""


def shape_of(directory: Path) -> tuple[int, int]:
    """(world size, ZeRO stage) a DeepSpeed checkpoint directory (`<checkpoint>/ds`) was saved
    at, from its file names."""
    z3_models = sorted(directory.glob("zero_pp_rank_*_model_states.pt"))
    if z3_models:
        return len(z3_models), 3
    optims = sorted(directory.glob("*zero_pp_rank_*_optim_states.pt"))
    if optims:
        # ZeRO 1 and 2 write the same layout; bf16 without ZeRO (`bf16_zero_pp_...`) too.
        stage = _read(optims[0], mapped=True)["optimizer_state_dict"].get("zero_stage", 1)
        return len(optims), int(stage)
    if (directory / "mp_rank_00_model_states.pt").is_file():
        return 1, 0
    raise ConversionError(f"{directory} holds no DeepSpeed model states")


def needs_conversion(saved: tuple[int, int], now: tuple[int, int]) -> bool:
    """Whether a checkpoint saved at (world size, stage) must be converted to load at `now`:
    ZeRO-0 checkpoints load at any world size; everything else only at its own shape."""
    (saved_world, saved_stage), (world, stage) = saved, now
    if saved_stage != stage:
        return True
    return stage != 0 and saved_world != world


def _read(path: Path, mapped: bool = False) -> Any:
    """A checked torch.save file; `mapped`: its tensors memory-mapped (read-only, copy on
    write), for shards whose tensors are only sliced and copied: no copy of the whole file."""
    guard.check_file(path)  # refuses a pickle that would run code, before anything unpickles it
    with torch.serialization.safe_globals(guard.allowed_objects()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)


def _ranked(files: list[Path]) -> list[Path]:
    ranked = sorted(files, key=lambda p: int(_RANK.search(p.name).group(1)))  # type: ignore[union-attr]
    if [int(_RANK.search(p.name).group(1)) for p in ranked] != list(range(len(ranked))):  # type: ignore[union-attr]
        raise ConversionError(f"shards missing: {[p.name for p in ranked]}")
    return ranked


def consolidate(directory: Path, join: bool = True) -> Consolidated:
    """The training state of the DeepSpeed checkpoint in `directory` (`<checkpoint>/ds`);
    `join=False`: a partitioned checkpoint's parameters as `pieces`, not joined."""
    world, stage = shape_of(directory)
    if stage == 3:
        models = _ranked(list(directory.glob("zero_pp_rank_*_model_states.pt")))
        # Mapped: every tensor of a partitioned checkpoint is copied out (joined) or copied in
        # (buffers), so nothing keeps the files' pages after this.
        model = _read(models[0], mapped=True)
        optims = _ranked(list(directory.glob("zero_pp_rank_*_optim_states.pt")))
        result = _partitioned_stage3(model, [_read(p, mapped=True)["optimizer_state_dict"] for p in optims], join)
    else:
        optims = _ranked(list(directory.glob("*zero_pp_rank_*_optim_states.pt")))
        # ZeRO-0's state is taken as it is (no join), so it is read into memory.
        model = _read(directory / "mp_rank_00_model_states.pt", mapped=bool(optims))
        if optims:
            result = _partitioned_stage12(model, [_read(p, mapped=True)["optimizer_state_dict"] for p in optims], join)
        else:
            result = _unpartitioned(model)
    buffer_names = set(model.get("buffer_names") or [])
    result.buffers = {n: t for n, t in (model.get("module") or {}).items() if n in buffer_names}
    result.engine = {key: model.get(key) for key in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}
    result.source = {"world_size": world, "zero_stage": stage}
    return result


def _split_state(state: dict[str, Any], flat_numel: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(per-element tensors, shared values) of one flat optimizer state. DeepSpeed saves the
    fp32 partition without its alignment padding and the optimizer state with it, so a
    per-element state may be longer than the partition (the padding is at its end)."""
    per_element = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= flat_numel}
    # Cloned: the shared values (a step tensor) outlive the (mapped) shard they come from.
    return per_element, {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items() if k not in per_element}


def _join(pieces: dict[str, dict[str, list[torch.Tensor]]], shapes: dict[str, Any], join: bool) -> Consolidated:
    for name in shapes:
        if name not in pieces:
            raise ConversionError(f"no shard holds parameter {name}")
    if not join:
        return Consolidated({}, {}, pieces=pieces, shapes={name: list(shape) for name, shape in shapes.items()})
    keys = list(dict.fromkeys(key for name in shapes for key in pieces[name]))  # "fp32", then the state's

    def join(key: str) -> dict[str, torch.Tensor]:
        return {name: torch.cat(pieces[name][key]).reshape(tuple(shape))
                for name, shape in shapes.items() if key in pieces[name]}

    # One thread per key (torch.cat releases the GIL): the copies are most of a worker's
    # conversion, from the shards (memory-mapped) into what the engine loads.
    with ThreadPoolExecutor(len(keys) or 1) as pool:
        joined = dict(zip(keys, pool.map(join, keys), strict=True))
    params = joined.pop("fp32")
    return Consolidated(params, {name: {key: by_name[name] for key, by_name in joined.items() if name in by_name}
                                 for name in shapes})


def _partitioned_stage12(model: dict[str, Any], ranks: list[dict[str, Any]], join: bool) -> Consolidated:
    """ZeRO 1/2 (and bf16 without ZeRO): rank r's flat fp32 partition of each param group
    holds the fragments its `param_slice_mappings` name; a parameter's fragments in rank order
    are the whole parameter."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    scalars: dict[str, Any] = {}
    for sd in ranks:
        groups = sd["base_optimizer_state"]["state"]
        for g, flat in enumerate(sd["single_partition_of_fp32_groups"]):
            per_element, shared = _split_state(groups[g], flat.numel())
            scalars.update(shared)
            for name, where in sd["param_slice_mappings"][g].items():
                parts = pieces.setdefault(name, {})
                for key, tensor in {"fp32": flat, **per_element}.items():
                    parts.setdefault(key, []).append(tensor.narrow(0, where.start, where.numel))
    shapes = {n: s for group in model["param_shapes"] for n, s in group.items()}
    result = _join(pieces, shapes, join)
    result.scalars = scalars
    result.hyper = [_without_params(g) for g in ranks[0]["base_optimizer_state"]["param_groups"]]
    return result


def _partitioned_stage3(model: dict[str, Any], ranks: list[dict[str, Any]], join: bool) -> Consolidated:
    """ZeRO 3: each parameter is split into N pieces of ceil(numel / N) (the last padded), and
    rank r's flat partition of a sub-group holds its piece of each parameter in order."""
    world = len(ranks)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    scalars: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for index, group_shapes in enumerate(model["param_shapes"]):
        shapes.update(group_shapes)
        for rank, sd in enumerate(ranks):
            flat = sd["fp32_flat_groups"][index]
            per_element, shared = _split_state(sd["optimizer_state_dict"]["state"][index], flat.numel())
            scalars.update(shared)
            offset = 0
            for name, shape in group_shapes.items():
                numel = math.prod(shape)
                partition = math.ceil(numel / world)
                take = max(0, min(partition, numel - rank * partition))
                parts = pieces.setdefault(name, {})
                for key, tensor in {"fp32": flat, **per_element}.items():
                    parts.setdefault(key, []).append(tensor.narrow(0, offset, take))
                offset += partition
    result = _join(pieces, shapes, join)
    result.scalars = scalars
    result.hyper = [_without_params(g) for g in ranks[0]["optimizer_state_dict"]["param_groups"]]
    return result


def _unpartitioned(model: dict[str, Any]) -> Consolidated:
    """ZeRO-0 in fp32: the module's parameters are the fp32 weights and `optimizer` is the
    torch optimizer's state dict, whose parameter indices follow `module.parameters()`."""
    buffers = set(model.get("buffer_names") or [])
    names = [n for n in model["module"] if n not in buffers]
    optimizer = model.get("optimizer") or {"state": {}, "param_groups": []}
    order = [i for group in optimizer["param_groups"] for i in group["params"]]
    params = {n: model["module"][n].float() for n in names}
    state: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    scalars: dict[str, Any] = {}
    for index in order:
        name = names[index]
        for key, value in optimizer["state"].get(index, {}).items():
            if torch.is_tensor(value) and value.shape == params[name].shape and value.dim() > 0:
                state[name][key] = value
            else:
                scalars[key] = value
    return Consolidated(params, state, scalars, [_without_params(g) for g in optimizer["param_groups"]])


def _without_params(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


# --- the conversion's record on disk ---------------------------------------------------------


def write(result: Consolidated, checkpoint: Path, stamp: tuple[str, int]) -> Path:
    """Keep the conversion of `checkpoint` as `<checkpoint>/consolidated/`: what it was
    converted from and into which parameters (`meta.json`), stamped with the checkpoint's
    identity (run name, epoch), with its own SHA-256 checksums; written whole or not at all.

    The bytes stay in the original shards: a worker joins each parameter's fragments from them
    (`resume_state`). A second copy of every weight and optimizer state bought nothing (the
    workers joined the copy's fragments just the same) and cost the driver a write of the
    whole checkpoint while every worker waited."""
    target = checkpoint / CONVERTED
    # Beside the checkpoint, not in it: a conversion cut short leaves nothing the guard reads.
    staging = checkpoint.parent / f".{checkpoint.name}.{CONVERTED}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        by_name = result.pieces or {name: {"fp32": value, **result.state[name]} for name, value in result.params.items()}
        meta = {"stamp": list(stamp), "source": result.source,
                "shapes": result.shapes or {name: list(value.shape) for name, value in result.params.items()},
                "pieces": {name: len(parts["fp32"]) if isinstance(parts["fp32"], list) else 1
                           for name, parts in by_name.items()},
                "state_keys": list(dict.fromkeys(key for parts in by_name.values() for key in parts if key != "fp32"))}
        (staging / _META).write_text(json.dumps(meta))
        (staging / _SUMS).write_text(json.dumps({_META: _sha256(staging / _META)}, indent=1))
        shutil.rmtree(target, ignore_errors=True)  # a damaged earlier record
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def verify(converted: Path, stamp: tuple[str, int] | None = None) -> str | None:
    """None if the conversion's record is whole, intact and (given `stamp`) the checkpoint's
    own, else what is wrong."""
    problem = check_sums(converted / _SUMS, converted.parent)
    if problem is None and not (converted / _META).is_file():
        return f"{CONVERTED}/ is incomplete"
    if problem is None and stamp is not None:
        recorded = json.loads((converted / _META).read_text()).get("stamp")
        if recorded != list(stamp):
            return f"{CONVERTED}/ belongs to another checkpoint ({recorded}, not {list(stamp)})"
    return problem


# --- into a new engine ------------------------------------------------------------------------


def check_shapes(saved: dict[str, list[int]], now: dict[str, list[int]]) -> str | None:
    """None if two models' parameters (name -> shape) agree, else the first difference."""
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            return f"{name} is in the checkpoint but not in the model"
        if name not in saved:
            return f"{name} is in the model but not in the checkpoint"
        if list(saved[name]) != list(now[name]):
            return f"{name} is {list(saved[name])} in the checkpoint, {list(now[name])} in the model"
    return None


def parameter_shapes(engine) -> dict[str, list[int]]:
    """The engine's parameters, name -> full shape (ZeRO-3 keeps the full one in `ds_shape`)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()}


def load(engine, result: Consolidated) -> None:
    """Make `engine` (any world size, any ZeRO stage) hold `result`'s weights, optimizer state,
    counters and scheduler. Every rank calls it (ZeRO 1/2 gather the updated weights)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    problem = check_shapes({n: list(t.shape) for n, t in result.params.items()}, parameter_shapes(engine))
    if problem:
        raise ModelMismatch(problem)
    named = dict(engine.module.named_parameters())
    wrapper = engine.optimizer
    base = getattr(wrapper, "optimizer", wrapper)  # ZeRO and bf16 wrap the torch optimizer
    partitioned = any(hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None for p in named.values())
    if not partitioned:
        _load_unpartitioned(named, base, result)
    else:
        keys = {key for state in result.state.values() for key in state}
        # The flat fp32 partitions the torch optimizer steps (ZeRO-3 puts each sub-group's into
        # its param group only while it steps it).
        flats = getattr(wrapper, "fp32_partitioned_groups_flat", None) or [
            p for group in base.param_groups for p in group["params"]]
        for flat in flats:  # optimizer state exists before the first step
            for key in keys:
                base.state[flat].setdefault(key, torch.zeros_like(flat))
        if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2: link the state views
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()
        for name, param in named.items():
            if hasattr(param, "ds_id"):  # ZeRO 3
                _set_partition(wrapper, param, result.params[name], None)
                for key, value in result.state[name].items():
                    _set_partition(wrapper, param, value, key)
                continue
            safe_set_full_fp32_param(param, result.params[name])
            for key, value in result.state[name].items():
                safe_set_full_optimizer_state(param, value, key)
        for flat in flats:
            for key, value in result.scalars.items():
                base.state[flat][key] = value.clone() if torch.is_tensor(value) else value
        _set_hyper(base.param_groups, result.hyper)
        _refresh_working_weights(wrapper)
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in result.buffers:
                buffer.copy_(result.buffers[name])
    counters = result.engine
    engine.global_steps = counters.get("global_steps") or 0
    engine.global_samples = counters.get("global_samples") or 0
    engine.skipped_steps = counters.get("skipped_steps") or 0
    if engine.lr_scheduler is not None and counters.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])


def _set_partition(wrapper, param, value: torch.Tensor, key: str | None) -> None:
    """This rank's piece of a full ZeRO-3 tensor: `safe_set_full_fp32_param` would do it, but
    it reads rank r's piece at r * ceil(numel / N) up to the padded end, past the tensor on the
    last rank whenever N does not divide the parameter (DeepSpeed 0.19.8)."""
    partition, _ = wrapper._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank, size = wrapper._get_param_partition_rank(param), partition.numel()
    flat = value.flatten()
    take = max(0, min(size, flat.numel() - rank * size))
    partition.data.narrow(0, 0, take).copy_(flat.narrow(0, rank * size, take))


def _load_unpartitioned(named: dict[str, torch.nn.Parameter], optimizer, result: Consolidated) -> None:
    by_id = {id(p): n for n, p in named.items()}
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(result.params[name])
    order = [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups, index = [], 0
    for i, group in enumerate(optimizer.param_groups):
        hyper = result.hyper[min(i, len(result.hyper) - 1)] if result.hyper else _without_params(group)
        groups.append({**hyper, "params": list(range(index, index + len(group["params"])))})
        index += len(group["params"])
    state = {i: {**result.scalars, **result.state[name]} for i, name in enumerate(order) if result.state[name]}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _set_hyper(groups: list[dict[str, Any]], hyper: list[dict[str, Any]]) -> None:
    for i, group in enumerate(groups):
        if hyper:
            group.update({k: v for k, v in hyper[min(i, len(hyper) - 1)].items() if k in group})


def _refresh_working_weights(wrapper) -> None:
    """Copy the loaded fp32 masters into the weights the forward pass uses."""
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO 3: this rank's partitions
        for lp, hp in zip(wrapper.fp16_partitioned_groups_flat, wrapper.fp32_partitioned_groups_flat, strict=True):
            if hp.numel() > 0:
                lp.data.copy_(hp.data)
        for i, flat in enumerate(wrapper.fp16_partitioned_groups_flat):
            for partition, updated in zip(wrapper.fp16_partitioned_groups[i],
                                          wrapper.unflatten(flat, wrapper.fp16_partitioned_groups[i]), strict=True):
                partition.data = updated.data
    else:  # ZeRO 1/2 and bf16: each rank copies its partition, then all-gather
        wrapper.update_lp_params()


# --- deciding, on the driver and in the workers -----------------------------------------------


def saved_shape(checkpoint: Path, state: dict[str, Any] | None = None) -> tuple[int, int]:
    """(world size, ZeRO stage) a stoker checkpoint was saved at: from its stoker state, or
    (checkpoints written before stoker recorded them) from DeepSpeed's file names."""
    if not (state and "world_size" in state and "zero_stage" in state):
        return shape_of(checkpoint / _TAG)
    world, stage = int(state["world_size"]), int(state["zero_stage"])
    if stage == 0 and any((checkpoint / _TAG).glob("*_optim_states.pt")):
        stage = 1  # bf16 without ZeRO: DeepSpeed's BF16_Optimizer partitions like ZeRO-1
    return world, stage


def _converted(checkpoint: Path, world_size: int, stage: int) -> tuple[dict, Path | None] | None:
    """None when DeepSpeed loads `checkpoint` as it is at (world_size, stage); else its stoker
    state and the record of its conversion, verified (None while it has none). A damaged or
    foreign record raises
    `ConversionError`."""
    state = json.loads((checkpoint / _STATE).read_text())
    if not needs_conversion(saved_shape(checkpoint, state), (world_size, stage)):
        return None
    converted = checkpoint / CONVERTED
    if not converted.exists():
        return state, None
    problem = verify(converted, (state["run"], int(state["epoch"])))
    if problem:
        raise ConversionError(f"the record of its conversion is damaged: {problem}")
    return state, converted


def prepare(checkpoint: Path, world_size: int, stage: int) -> bool:
    """Convert `checkpoint` for (world_size, stage) if it needs it and has no record of its
    conversion yet; True if it now has one. Raises `ConversionError` (the caller falls back to an earlier
    checkpoint) when it cannot be converted, or when the record of its conversion is damaged."""
    found = _converted(checkpoint, world_size, stage)
    if found is None:
        return False
    state, copy = found
    if copy is None:
        write(_consolidate_or_explain(checkpoint, join=False), checkpoint, (state["run"], int(state["epoch"])))
    return True


def resume_state(checkpoint: Path, world_size: int, stage: int) -> Consolidated | None:
    """What a worker loads: None when DeepSpeed loads `checkpoint` as it is, else its
    consolidated state, joined here from the original shards (the driver checked that they
    convert, and recorded it, before the workers started; on S3 storage it records nothing and
    this is the first conversion). `ConversionError` as `prepare`."""
    if _converted(checkpoint, world_size, stage) is None:
        return None
    return _consolidate_or_explain(checkpoint)


def _consolidate_or_explain(checkpoint: Path, join: bool = True) -> Consolidated:
    try:
        return consolidate(checkpoint / _TAG, join)
    except ConversionError:
        raise
    except (KeyError, IndexError, AttributeError, RuntimeError, ValueError, OSError) as error:
        # An unexpected layout (another DeepSpeed version, a damaged shard): one line, and the
        # caller falls back to an earlier checkpoint.
        raise ConversionError(f"{type(error).__name__}: {error}") from None

