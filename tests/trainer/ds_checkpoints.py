"""Real DeepSpeed checkpoints without Ray: one process, world size 1, gloo.

Each checkpoint is written the way the workers write theirs (stoker.trainer.loop): the stamp,
`engine.save_checkpoint(dir, tag="ds")`, then `checkpoints.finish` (RNG, state, checksums). The
model is stoker's MLP on the digits' shape (64 features, 10 classes), so a checkpoint can be
dropped into a run directory of the `prepared` digits dataset and exported.

    python -m tests.trainer.ds_checkpoints OUT [--matrix] [--list-globals]

OUT/<name>/checkpoint_0/ for each configuration, and OUT/results.json: per configuration the
globals each file asks for and whether a resume through `stoker.trainer.loop._resume`
continues bit-identically (the weights after 2 + 2 steps with a save/resume in between equal
those of 4 uninterrupted steps). Without --matrix: ZeRO 0-3, fp32, no offload (the tests);
with it: every ZeRO stage x bf16 on/off x optimizer offload on/off, plus the other optimizers
and schedulers stoker configures (the allow-list's derivation). fp16 is left out: DeepSpeed
cannot train it on CPU ("Type fp16 is not supported on your device").
"""

import argparse
import json
import os
import sys
from pathlib import Path

from tests.ports import free_port

RUN = "ds-checkpoint"
OTHER = "other-run"
HIDDEN = [32]
STEPS = 2


def _init_distributed() -> None:
    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def configurations(matrix: bool) -> list[dict]:
    if not matrix:
        return [{"stage": s, "bf16": False, "offload": False} for s in range(4)]
    grid = [{"stage": s, "bf16": b, "offload": o} for s in range(4) for b in (False, True) for o in (False, True)
            if not (o and s == 0)]  # offload needs ZeRO 1+ (DeepSpeed refuses it at stage 0)
    grid += [{"stage": s, "bf16": False, "offload": False, "optimizer": name} for s in (0, 2, 3)
             for name in ("adam", "sgd", "rmsprop")]
    grid += [{"stage": s, "bf16": b, "offload": False, "schedule": name} for s in (0, 2) for b in (False, True)
             for name in ("warmup_cosine", "warmup_linear", "constant")]
    return grid


def name_of(c: dict) -> str:
    return (f"zero{c['stage']}-{'bf16' if c['bf16'] else 'fp32'}{'-offload' if c['offload'] else ''}"
            f"{'-' + c['optimizer'] if c.get('optimizer') else ''}{'-' + c['schedule'] if c.get('schedule') else ''}")


def build(c: dict):
    import torch

    from stoker.trainer.config import ModelConfig, TrainConfig
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.deepspeed_engine import build_engine
    from stoker.trainer.models import InputSpec, build_model, parameter_count

    model, spec = ModelConfig(name="mlp", hidden=HIDDEN), InputSpec("tabular", (64,), 10, "classification")
    train = TrainConfig(batch_size=8, epochs=2, optimizer={"name": c.get("optimizer", "adamw"), "lr": 0.01},
                        schedule={"name": c.get("schedule", "constant"), "warmup_steps": 1},
                        deepspeed={"zero_stage": c["stage"], "bf16": c["bf16"], "offload_optimizer": c["offload"]})
    with torch.device("meta"):
        params = parameter_count(build_model(model, spec))
    torch.manual_seed(0)
    engine, _, _ = build_engine(model, spec, deepspeed_config(train, 1, 2 * STEPS, params))
    return engine


def steps(engine, count: int, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    for _ in range(count):
        x = torch.randn(8, 64, generator=generator).to(dtype)
        y = torch.randint(0, 10, (8,), generator=generator)
        engine.backward(torch.nn.functional.cross_entropy(engine(x).float(), y))
        engine.step()


def weights(engine) -> dict:
    """Full weights (gathered under ZeRO-3), as float32 lists keyed by name."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def save(engine, directory: Path, epoch: int, run: str = RUN) -> None:
    from stoker.trainer import checkpoint_guard as guard
    from stoker.trainer import checkpoints as ckpt

    guard.stamp(engine, run, epoch)
    engine.save_checkpoint(str(directory), tag=ckpt.CHECKPOINT_TAG)
    ckpt.finish(directory, 0, {"run": run, "epoch": epoch, "best": {"epoch": epoch}, "history": []})


def one(c: dict, out: Path, listing: bool) -> dict:
    import torch

    from stoker.trainer import checkpoint_guard as guard
    from stoker.trainer.loop import _resume

    directory = out / name_of(c) / "checkpoint_0"
    directory.mkdir(parents=True)
    engine = build(c)
    steps(engine, STEPS, seed=1)
    saved = weights(engine)
    save(engine, directory, epoch=0)
    if c["stage"] == 2 and not listing:  # the same weights, saved as another run's checkpoint
        save(engine, out / name_of(c) / OTHER / "checkpoint_0", epoch=0, run=OTHER)
    steps(engine, STEPS, seed=2)
    straight = weights(engine)
    del engine

    again = build(c)
    allowed = guard.EVERYTHING if listing else guard.ALLOWED
    files = {str(p.relative_to(directory)): sorted(guard.check_file(p, allowed)[0])
             for p in guard.pickled_files(directory)}
    if listing:
        return {"name": name_of(c), "config": c, "files": files}
    _resume(again, directory, directory, 0)  # stoker's resume: checksums, guard, load, RNG
    resumed_at = weights(again)
    steps(again, STEPS, seed=2)
    resumed = weights(again)
    torch.save(saved, out / name_of(c) / "saved_weights.pt")
    return {
        "name": name_of(c), "config": c, "files": files,
        "resume_restores": all(torch.equal(saved[k], resumed_at[k]) for k in saved),
        "resume_bit_identical": all(torch.equal(straight[k], resumed[k]) for k in straight),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--matrix", action="store_true")
    parser.add_argument("--list-globals", action="store_true", help="print each global with the configurations and files that ask for it")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    _init_distributed()
    results = [one(c, args.out, args.list_globals) for c in configurations(args.matrix)]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.list_globals:
        users: dict[str, set[str]] = {}
        for result in results:
            for file, found in result["files"].items():
                for name in found:
                    users.setdefault(name, set()).add(f"{result['name']}:{file.split('/')[-1]}")
        for name in sorted(users):
            print(name, file=sys.__stdout__)
            for where in sorted(users[name]):
                print("   ", where, file=sys.__stdout__)


if __name__ == "__main__":
    main()
