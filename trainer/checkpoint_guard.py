"""A checkpoint is data, never code: every pickle in a checkpoint is checked before anything
unpickles it.

DeepSpeed's shards (`ds/*.pt`) are `torch.save` zip archives whose `data.pkl` DeepSpeed's own
`load_checkpoint` (and `zero_to_fp32`) read with `torch.load(weights_only=False)`: a pickle
whose GLOBAL names `os.system` runs it. So before any such load, stoker walks each pickle's
opcodes with `pickletools` (nothing is executed and no object is built; only the `data.pkl`
entries are read, never the tensor bytes) and refuses the file unless

- every global it asks for (GLOBAL / STACK_GLOBAL, including the storage types inside
  torch's persistent ids) is in `ALLOWED` below,
- every call (REDUCE, NEWOBJ) calls such a global directly, and attribute setting (BUILD) is
  on an object the pickle built, never on a class or function,
- it uses no opcode that DeepSpeed's checkpoints never contain and that can reach a callable
  some other way (INST, OBJ, EXT*, PERSID), and it is complete (ends in STOP),
- it is a `torch.save` zip archive (the legacy and raw-pickle formats are never written by
  DeepSpeed or stoker and are refused outright).

These are the rules of PyTorch's own restricted unpickler (`torch.load(weights_only=True)`),
enforced without running it; tests/trainer/test_checkpoint_guard.py checks that every real
checkpoint also loads with `weights_only=True` under `torch.serialization.safe_globals`
with exactly this allow-list.

A refused file is a `UserError` (exit 2) with one line naming the file and what it asked for.

Cost (benchmarks/checkpoint_guard.py, 38M parameters, a 577 MB ZeRO-2 checkpoint on a warm
page cache): 2 ms, against 1.0 s for the SHA-256 check that precedes it and 1.1 s for
DeepSpeed's load; PyTorch's restricted loader over the same files (tensors memory-mapped)
took 6 ms.

Each DeepSpeed file also carries the checkpoint's identity (stoker writes `STAMP_KEY` into the
DeepSpeed config that DeepSpeed saves into every file, see `stamp`): a shard copied in from
another run's (or epoch's) checkpoint is refused even when its checksums were recomputed.
"""

import json
import pickletools
import zipfile
from collections.abc import Container
from pathlib import Path
from typing import BinaryIO

from stoker.errors import UserError

# The globals DeepSpeed's and stoker's checkpoints ask for, found by
# `python -m tests.trainer.ds_checkpoints OUT --matrix --list-globals` in real checkpoints of
# ZeRO stages 0-3 x bf16 on/off x optimizer offload on/off, with every optimizer (AdamW, Adam,
# SGD, RMSprop) and schedule stoker configures (35 configurations). fp16 cannot be trained on
# CPU (DeepSpeed: "Type fp16 is not supported on your device"); the two fp16 entries come from
# DeepSpeed's source: its fp16 optimizers save a DynamicLossScaler, and fp16 weights a
# HalfStorage. Everything else is refused.
ALLOWED: dict[str, str] = {
    "torch._utils._rebuild_tensor_v2": "every tensor: torch.save pickles a tensor as a call to it",
    "torch._tensor._rebuild_from_type_v2": "ZeRO-3 optimizer shards: tensors saved with their type (torch.Tensor)",
    "torch.Tensor": "the type _rebuild_from_type_v2 names in ZeRO-3 optimizer shards",
    "torch.FloatStorage": "storage type of float32 tensors (inside each tensor's persistent id)",
    "torch.BFloat16Storage": "storage type of bf16 tensors: model states of bf16 runs",
    "torch.HalfStorage": "storage type of fp16 tensors: model states of fp16 runs (GPU only)",
    "torch.Size": "ZeRO 1-3 model states: param_shapes",
    "collections.OrderedDict": "state dicts (module, param_shapes) and each tensor's empty backward-hook dict",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "ZeRO 1-3 optimizer shards: the static loss scaler (fp32, bf16)",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "ZeRO 1-3 optimizer shards of fp16 runs (GPU only)",
    "deepspeed.runtime.zero.config.ZeroStageEnum": "ZeRO 1-3 optimizer shards: the stage they were written at",
    "deepspeed.utils.tensor_fragment.fragment_address": "ZeRO 1-2 optimizer shards: where each parameter lies "
                                                        "in the flat partition",
}

# stoker.trainer.checkpoints.STATE_FILE (that module imports torch; this one must not, the CLI
# imports it).
_STATE_FILE = "stoker_state.json"

# stoker's identity of the checkpoint a DeepSpeed file belongs to (see `stamp`).
STAMP_KEY = "stoker_checkpoint"

# Opcodes that reach a callable without naming a global (INST/OBJ: protocol 0/1 class calls;
# EXT*: the copyreg extension registry; PERSID: a text persistent id). torch.save (protocol 2)
# never writes them.
_REFUSED_OPCODES = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"}
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
            "SHORT_BINSTRING"}
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLED = (".pt", ".pth", ".bin", ".pkl", ".pickle")


class _Mark:
    pass


class _Global(str):
    """A global the pickle looked up (a class or function): the only thing it may call."""


class _Str(str):
    """A string literal on the pickle's stack."""


_MARK, _OBJ = _Mark(), object()


class Refused(Exception):
    """Why one pickle is refused (the caller adds the file's name)."""


class _Everything:
    def __contains__(self, name: object) -> bool:
        return True


EVERYTHING = _Everything()
"""An `allowed` that lists what a file asks for without refusing it (deriving `ALLOWED`)."""


def pickle_globals(data: bytes, allowed: Container[str] = ALLOWED) -> tuple[set[str], list[str]]:
    """(the globals a pickle asks for, the identity stamps it carries); raises `Refused` for a
    global outside `allowed` or anything else the rules above refuse. Executes nothing."""
    stack: list = []
    memo: dict = {}
    found: set[str] = set()
    stamps: list[str] = []

    def ask(name: str) -> _Global:
        if name not in allowed:
            raise Refused(f"it asks for {name}, which is not a type DeepSpeed or stoker checkpoints hold")
        found.add(name)
        return _Global(name)

    def pop_to_mark() -> list:
        items = []
        while stack:
            item = stack.pop()
            if item is _MARK:
                return items[::-1]
            items.append(item)
        raise Refused("malformed pickle (no mark)")

    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _REFUSED_OPCODES:
                raise Refused(f"it uses pickle opcode {name}, which checkpoints never contain")
            if name in _STRINGS:
                stack.append(_Str(arg))
            elif name == "GLOBAL":
                stack.append(ask(arg.replace(" ", ".", 1)))
            elif name == "STACK_GLOBAL":
                qualname, module = stack.pop(), stack.pop()
                if not (isinstance(module, _Str) and isinstance(qualname, _Str)):
                    raise Refused("it looks up a global by a computed name")
                stack.append(ask(f"{module}.{qualname}"))
            elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
                del stack[len(stack) - len(op.stack_before) + 1:]
                if not isinstance(stack.pop(), _Global):
                    raise Refused(f"it calls something other than an allowed type ({name})")
                stack.append(_OBJ)
            elif name == "BUILD":
                stack.pop()
                if isinstance(stack[-1], _Global):
                    raise Refused(f"it sets attributes of {stack[-1]} itself (BUILD on a class)")
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                if key == STAMP_KEY and isinstance(value, _Str):
                    stamps.append(str(value))
            elif name == "STOP":
                break
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    items = pop_to_mark()
                    if name == "SETITEMS":
                        for key, value in zip(items[::2], items[1::2], strict=True):
                            if key == STAMP_KEY and isinstance(value, _Str):
                                stamps.append(str(value))
                    del stack[len(stack) - before.index(pickletools.markobject):]
                else:
                    del stack[len(stack) - len(before):]
                stack.extend(_MARK if kind is pickletools.markobject else _OBJ for kind in op.stack_after)
        else:
            raise Refused("it is truncated (the pickle ends before its STOP)")
    except ValueError as error:  # genops: a truncated or garbled pickle
        raise Refused(f"it is truncated or corrupt ({error})") from None
    except (IndexError, KeyError):
        raise Refused("malformed pickle (stack or memo underflow)") from None
    return found, stamps


def check_file(path: Path, allowed: Container[str] = ALLOWED) -> tuple[set[str], list[str]]:
    """(globals, stamps) of one checkpoint file; `UserError` naming the file if refused."""
    try:
        with open(path, "rb") as handle:
            return _check_archive(handle, path, allowed)
    except OSError as error:
        raise UserError(f"{path}: refused to load this checkpoint file: it cannot be read ({error})") from None


def _check_archive(handle: BinaryIO, name: object, allowed: Container[str]) -> tuple[set[str], list[str]]:
    """`check_file` on an open file (local, or on S3: only the zip's directory and its
    data.pkl are fetched, never the tensors)."""
    try:
        magic = handle.read(4)
        if magic != _ZIP_MAGIC:
            kind = "a raw pickle" if magic[:1] == b"\x80" else "not a torch.save archive"
            raise Refused(f"{kind} (DeepSpeed and stoker write torch.save zip archives only), or truncated")
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            pickles = [info for info in archive.infolist() if info.filename.endswith(".pkl")]
            if not pickles:
                raise Refused("not a torch.save archive (no data.pkl)")
            found: set[str] = set()
            stamps: list[str] = []
            for info in pickles:  # torch reads <archive>/data.pkl; check every pickle there
                more, marks = pickle_globals(archive.read(info), allowed)
                found |= more
                stamps += marks
            return found, stamps
    except Refused as why:
        raise UserError(f"{name}: refused to load this checkpoint file: {why}") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise UserError(f"{name}: refused to load this checkpoint file: it is truncated or corrupt "
                        f"({error})") from None


def pickled_files(directory: Path) -> list[Path]:
    """Every file in a checkpoint directory that a loader could unpickle: by name, or by
    content (a zip archive or a pickle under any other name)."""
    found = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.suffix in _PICKLED:
            found.append(path)
            continue
        with open(path, "rb") as handle:
            if _looks_pickled(handle.read(4)):
                found.append(path)
    return found


def _looks_pickled(head: bytes) -> bool:
    return head == _ZIP_MAGIC or head[:1] == b"\x80"


def check_checkpoint(directory: Path, expected: tuple[str, int] | None = None) -> None:
    """Refuse (UserError, one line naming the file) a checkpoint directory any of whose
    pickled files asks for a type outside `ALLOWED`, is truncated, or carries another
    checkpoint's stamp than `expected` (run name, epoch: the checkpoint's stoker state) or
    than the checkpoint's other files."""
    _compare_stamps([(path, check_file(path)[1]) for path in pickled_files(directory)], expected)


def check_remote_checkpoint(fs, prefix: str, uri: str) -> None:
    """`check_checkpoint` for a checkpoint on S3 (an fsspec filesystem and the checkpoint's
    key prefix; `uri` names it in messages), before anything downloads it: each file is read
    with small range requests (the zip's directory and data.pkl), never whole."""
    items: list[tuple[str, list[str]]] = []
    expected = None
    for key in sorted(fs.find(prefix)):
        relative = key[len(prefix.rstrip("/")) + 1:]
        name = f"{uri.rstrip('/')}/{relative}"
        with fs.open(key, "rb", block_size=1 << 16) as handle:
            if relative == _STATE_FILE:
                try:
                    state = json.loads(handle.read())
                except ValueError:
                    raise UserError(f"{name}: unreadable (not JSON); not a checkpoint stoker wrote") from None
                expected = (state["run"], int(state["epoch"])) if "run" in state and "epoch" in state else None
                continue
            if not (relative.endswith(_PICKLED) or _looks_pickled(handle.read(4))):
                continue
            handle.seek(0)
            items.append((name, _check_archive(handle, name, ALLOWED)[1]))
    _compare_stamps(items, expected)


def _compare_stamps(items: list[tuple[object, list[str]]], expected: tuple[str, int] | None) -> None:
    seen: dict[str, object] = {}
    for name, stamps in items:
        for stamp in stamps:
            seen.setdefault(stamp, name)
    if not seen:
        return  # written before stoker stamped its checkpoints: nothing to compare
    if expected is not None:
        want = stamp_of(*expected)
        for stamp, name in seen.items():
            if stamp != want:
                raise UserError(f"{name}: refused to load this checkpoint file: it belongs to another checkpoint "
                                f"({_describe(stamp)}), not this one ({_describe(want)})")
    elif len(seen) > 1:
        (_, first), (stamp, name) = list(seen.items())[:2]
        raise UserError(f"{name}: refused to load this checkpoint file: it belongs to another checkpoint "
                        f"({_describe(stamp)}) than {first}")
    # DeepSpeed saves its config into every file it writes, so each of its files in a
    # directory where one is stamped must be too (files stoker derives elsewhere need not be).
    stamped_dirs = {_parent(name) for name, stamps in items if stamps}
    for name, stamps in items:
        if not stamps and _parent(name) in stamped_dirs:
            raise UserError(f"{name}: refused to load this checkpoint file: it carries no checkpoint stamp "
                            "while the rest of the checkpoint does (copied from another run?)")


def _parent(name: object) -> str:
    return str(name).rsplit("/", 1)[0]


def allowed_objects() -> list:
    """`ALLOWED` as objects, for `torch.serialization.safe_globals` (PyTorch's restricted
    unpickler, `torch.load(weights_only=True)`, with the same allow-list)."""
    import importlib

    found = []
    for name in ALLOWED:
        module, _, attribute = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):  # e.g. DeepSpeed absent: its types cannot occur
            continue
    return found


def stamp_of(run: str, epoch: int) -> str:
    return json.dumps([run, epoch])


def _describe(stamp: str) -> str:
    try:
        run, epoch = json.loads(stamp)
        return f"run {run!r} epoch {epoch}"
    except (ValueError, TypeError):
        return repr(stamp)


def stamp(engine, run: str, epoch: int) -> None:
    """Make the next `engine.save_checkpoint` write this checkpoint's identity into every file:
    DeepSpeed saves its config dict (`engine.config`) into each model-state and optimizer file,
    on every rank, so the key set here lands in all of them."""
    engine.config[STAMP_KEY] = stamp_of(run, epoch)
