"""What checking a checkpoint's pickles costs a resume, on a ~38M-parameter checkpoint.

The model is benchmarks/zero_memory.py's (stoker's MLP 1024 -> 4096 x 3 -> 10, AdamW), trained
a step with DeepSpeed in one process (world size 1, gloo) and saved the way the workers save
(stamp, `save_checkpoint`, `checkpoints.finish`). Then, each timed `--repeat` times on a warm
page cache (median reported), in seconds:

- `verify_before_s`: `checkpoints.verify` as it was before the guard (SHA-256 of every file);
- `verify_after_s`: `checkpoints.verify` now (SHA-256 + stoker.trainer.checkpoint_guard);
- `guard_s`: the guard alone (reads only each archive's data.pkl, executes nothing);
- `torch_restricted_s`: the alternative, `torch.load(weights_only=True, mmap=True)` of every
  file under the same allow-list (PyTorch's restricted unpickler, tensors memory-mapped);
- `load_checkpoint_s`: DeepSpeed's `engine.load_checkpoint` itself (the resume's load);
- `resume_before_s` / `resume_after_s`: verify + load, without and with the guard.

Prints one JSON line. Usage: .venv/bin/python benchmarks/checkpoint_guard.py [--stage 2] [--repeat 5]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

WIDTH, DEPTH, IN, OUT, BATCH = 4096, 3, 1024, 10, 16


def _timed(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    import torch

    from stoker.trainer import checkpoint_guard as guard
    from stoker.trainer import checkpoints as ckpt
    from stoker.trainer.config import ModelConfig, TrainConfig
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.deepspeed_engine import build_engine
    from stoker.trainer.models import InputSpec, parameter_count

    deepspeed.init_distributed(dist_backend="gloo")
    model, spec = ModelConfig(name="mlp", hidden=[WIDTH] * DEPTH), InputSpec("tabular", (IN,), OUT, "classification")
    train = TrainConfig(batch_size=BATCH, deepspeed={"zero_stage": args.stage})
    torch.manual_seed(0)
    engine, _, _ = build_engine(model, spec, deepspeed_config(train, 1, 10, 38_000_000))
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
    engine.step()

    scratch = Path(tempfile.mkdtemp(prefix="stoker-guard-bench-"))
    try:
        directory = scratch / "checkpoint_0"
        guard.stamp(engine, "bench", 0)
        engine.save_checkpoint(str(directory), tag=ckpt.CHECKPOINT_TAG)
        ckpt.finish(directory, 0, {"run": "bench", "epoch": 0})
        files = guard.pickled_files(directory)
        out = {"params": parameter_count(engine.module), "zero_stage": args.stage,
               "checkpoint_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1), "files": len(files)}

        def verify_without_guard():
            real = guard.check_checkpoint
            guard.check_checkpoint = lambda *a, **k: None
            try:
                assert ckpt.verify(directory) is None
            finally:
                guard.check_checkpoint = real

        def restricted():
            for path in files:
                with torch.serialization.safe_globals(guard.allowed_objects()):
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)

        ckpt.verify(directory)  # warm the page cache: every figure below reads from memory
        out["verify_before_s"] = _timed(verify_without_guard, args.repeat)
        out["verify_after_s"] = _timed(lambda: ckpt.verify(directory), args.repeat)
        out["guard_s"] = _timed(lambda: guard.check_checkpoint(directory, ("bench", 0)), args.repeat)
        out["torch_restricted_s"] = _timed(restricted, args.repeat)
        out["load_checkpoint_s"] = _timed(lambda: engine.load_checkpoint(str(directory), tag=ckpt.CHECKPOINT_TAG),
                                          args.repeat)
        out["resume_before_s"] = round(out["verify_before_s"] + out["load_checkpoint_s"], 4)
        out["resume_after_s"] = round(out["verify_after_s"] + out["load_checkpoint_s"], 4)
        out["added_fraction"] = round(out["resume_after_s"] / out["resume_before_s"] - 1, 4)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(out), file=sys.__stdout__)


if __name__ == "__main__":
    main()
