"""The resize matrix on real DeepSpeed engines: CPU, gloo, one process per rank, no Ray.

Each source (N ranks, ZeRO stage s) trains stoker's digits-shaped MLP two steps (every rank
on its own batches, so the ranks' gradients differ) and saves the way the workers do (stamp,
`save_checkpoint(tag="ds")`, `checkpoints.finish`); rank 0 also records the truth through
DeepSpeed's own accessors (`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`, or
the parameters and the torch optimizer under ZeRO-0): every parameter's fp32 weights and Adam
state, and the step. Each case then builds a fresh engine at (M ranks, stage t), resumes as
the driver and the workers do (`checkpoint_resize.prepare`, then `loop._resume`), reads the
same truth back and counts the case exact when every tensor is `torch.equal` to the saved one.

Used by tests/trainer/test_checkpoint_resize.py (a subset) and benchmarks/elastic.py (all).
"""

import json
import os
import shutil
from pathlib import Path

from tests.ports import free_port

HIDDEN = [37, 23]  # odd sizes: ZeRO-3 pads its partitions at 2 and 3 ranks
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def full_matrix() -> list[tuple[int, int, int, int]]:
    """(N, s, M, t): N -> M in {1,2,3} x {1,2,3} at each ZeRO stage, plus stage changes."""
    cases = [(n, s, m, s) for s in range(4) for n in (1, 2, 3) for m in (1, 2, 3)]
    return cases + [(2, 1, 2, 3), (3, 3, 2, 2), (2, 0, 1, 2), (2, 2, 3, 0)]


def quick_matrix() -> list[tuple[int, int, int, int]]:
    """A representative subset: 2 -> 1, 1 -> 3, 3 -> 2 at each stage, and the stage changes."""
    cases = [(n, s, m, s) for s in range(4) for n, m in ((2, 1), (1, 3), (3, 2))]
    return cases + [(2, 1, 2, 3), (3, 3, 2, 2), (2, 0, 1, 2), (2, 2, 3, 0)]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), TQDM_DISABLE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def build(stage: int, world: int):
    import torch

    from stoker.trainer.config import ModelConfig, TrainConfig
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.deepspeed_engine import build_engine
    from stoker.trainer.models import InputSpec

    model, spec = ModelConfig(name="mlp", hidden=HIDDEN), InputSpec("tabular", (64,), 10, "classification")
    train = TrainConfig(batch_size=8, epochs=4, optimizer={"name": "adamw", "lr": 0.01},
                        schedule={"name": "warmup_cosine", "warmup_steps": 1}, deepspeed={"zero_stage": stage})
    torch.manual_seed(0)
    engine, _, _ = build_engine(model, spec, deepspeed_config(train, world, 4))
    return engine


def _steps(engine, count: int, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x, y = torch.randn(8, 64, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()


def truth(engine) -> dict:
    """Every parameter's fp32 weights and Adam state, the step, the counters (a collective)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    found: dict = {}
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()  # ZeRO 1/2 link it at the first step
    for name, param in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0:
            state = optimizer.state[param]
            found[name] = {"fp32": param.detach().clone(), **{k: state[k].clone() for k in ADAM_KEYS}}
        else:
            found[name] = {"fp32": safe_get_full_fp32_param(param).clone(),
                           **{k: safe_get_full_optimizer_state(param, k).clone() for k in ADAM_KEYS}}
    step = next(state["step"] for state in optimizer.state.values() if "step" in state)
    found["_step"] = {"step": torch.as_tensor(step).float().reshape(1),
                      "global_steps": torch.tensor([float(engine.global_steps)])}
    return found


def _source_dir(out: Path, world: int, stage: int) -> Path:
    return out / f"n{world}-z{stage}" / "checkpoint_0"


def _save(rank: int, world: int, out: Path, stages: list[int]) -> None:
    import torch
    import torch.distributed as dist

    from stoker.trainer import checkpoint_guard as guard
    from stoker.trainer import checkpoints as ckpt

    for stage in stages:
        engine = build(stage, world)
        _steps(engine, 2, seed=100 + rank)
        expected = truth(engine)
        # Each rank into a directory of its own, merged afterwards, as Ray Train does.
        mine = out / f"n{world}-z{stage}" / f"rank{rank}"
        guard.stamp(engine, "resize", 0)
        engine.save_checkpoint(str(mine), tag="ds")
        state = ckpt.stoker_state({"run": "resize", "epoch": 0, "best": None, "history": []}, engine)
        ckpt.finish(mine, rank, state if rank == 0 else None)
        dist.barrier()
        if rank == 0:
            for r in range(world):
                shutil.copytree(mine.parent / f"rank{r}", _source_dir(out, world, stage), dirs_exist_ok=True)
            torch.save(expected, mine.parent / "truth.pt")
        del engine


def _group(rank: int, world: int, port: int, out: Path, stages: list[int], cases: list) -> None:
    """One process group: save this world size's sources, then resume the cases given."""
    _init(rank, world, port)
    _save(rank, world, out, stages)
    _load(rank, world, out, cases)


def _load(rank: int, world: int, out: Path, cases: list[tuple[int, int, int, int]]) -> None:
    import torch
    import torch.distributed as dist

    from stoker.trainer import checkpoint_resize as resize
    from stoker.trainer.loop import _resume

    if not cases:
        return
    results = []
    for n, s, m, t in cases:
        source = _source_dir(out, n, s)
        # A copy per case: the conversion is kept inside the checkpoint it converts.
        directory = out / f"case-{n}{s}-{m}{t}" / "checkpoint_0"
        if rank == 0:
            shutil.copytree(source, directory)
            resize.prepare(directory, m, t)  # what the driver does before the workers start
        dist.barrier()
        engine = build(t, world)
        _resume(engine, directory, directory, rank)
        found = truth(engine)
        if rank == 0:
            saved = torch.load(source.parent / "truth.pt", weights_only=True)
            wrong = [f"{name}.{key}" for name in saved for key in saved[name]
                     if not torch.equal(saved[name][key], found[name][key])]
            results.append({"case": [n, s, m, t], "exact": not wrong, "wrong": wrong[:5],
                            "converted": (directory / resize.CONVERTED).is_dir()})
        del engine
    if rank == 0:
        (out / f"results-m{world}.json").write_text(json.dumps(results))


def run_matrix(out: Path, cases: list[tuple[int, int, int, int]]) -> list[dict]:
    """Save every source the cases need, resume every case; one result per case. Process
    groups are the cost (each rank imports DeepSpeed and joins gloo), so the largest world
    size saves its sources and resumes its cases in one group, after the smaller ones saved."""
    import torch.multiprocessing as mp

    sources: dict[int, set[int]] = {}
    for n, s, _, _ in cases:
        sources.setdefault(n, set()).add(s)
    sizes = sorted(set(sources) | {m for _, _, m, _ in cases})
    plan = [(w, sorted(sources.get(w, ())), []) for w in sizes[:-1]]
    plan.append((sizes[-1], sorted(sources.get(sizes[-1], ())), [c for c in cases if c[2] == sizes[-1]]))
    plan += [(w, [], [c for c in cases if c[2] == w]) for w in sizes[:-1]]
    results = []
    for world, stages, mine in plan:
        if stages or mine:
            mp.spawn(_group, args=(world, free_port(), out, stages, mine), nprocs=world)
        if mine:
            results += json.loads((out / f"results-m{world}.json").read_text())
    return results
