"""Peak resident memory per worker at ZeRO 0/1/2/3 for a model whose optimizer state dominates.

stoker's own path: `stoker.trainer.deepspeed_engine.build_engine` (ZeRO-3 builds the model inside
`deepspeed.zero.Init`) with the DeepSpeed JSON that `stoker train` generates for the model
(buckets sized to it). The model is stoker's MLP 1024 -> 4096 x 3 -> 10, ~38M parameters:
fp32 weights 151 MB, gradients 151 MB, AdamW's two moments 302 MB, against activations of a
few MB at batch 16. Two Ray Train workers each run a few AdamW steps on the same random batches
in every mode; the trainings run one after another, each in fresh worker processes.

Peak RSS is the kernel's high-water mark of each worker process (VmHWM, which also covers
DeepSpeed's transient buffers between samples), read once the steps are done. `added_mb` is
the peak minus the worker's RSS before the model was built (imports, Ray, gloo), i.e. what
training itself cost. Every worker's figure is reported; the comparison uses the worst one.
Prints one JSON line: {"zero0": {"peak_rss_mb": [w0, w1], "added_mb": [..]}, ...,
"params": N, "ratio_vs_zero0": {...}, "ok": ZeRO 2 and 3 below ZeRO 0}.

With --baseline (the default) the same four trainings also run the way stoker ran them before
(model built whole on every rank, DeepSpeed's default 5e8-element buckets and ZeRO-3 live-
parameter limits, torch's foreach AdamW, glibc's default malloc), under "deepspeed_defaults".
stoker's rows set glibc's mmap threshold in the worker (`distribute.limit_heap_retention`,
called by `build_engine`), as `stoker train` does.

Usage: .venv/bin/python benchmarks/zero_memory.py [--bf16] [--steps 3] [--no-baseline]
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

WIDTH, DEPTH, IN, OUT, BATCH = 4096, 3, 1024, 10, 16


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


def model_and_spec():
    """The benchmark's model (stoker's MLP, ~38M parameters) and its input; benchmarks/elastic.py
    saves and converts checkpoints of it too."""
    from stoker.trainer.config import ModelConfig
    from stoker.trainer.models import InputSpec

    return ModelConfig(name="mlp", hidden=[WIDTH] * DEPTH), InputSpec("tabular", (IN,), OUT, "classification")


def worker(config: dict) -> dict:
    import torch
    from torch import nn

    from stoker.trainer.deepspeed_engine import build_engine
    from stoker.trainer.models import parameter_count

    before = _status_mb("VmRSS:")
    torch.manual_seed(0)
    model_config, spec = model_and_spec()
    if config["defaults"]:
        # The baseline: the model built whole on every rank and DeepSpeed's own defaults.
        import deepspeed

        from stoker.trainer.models import build_model

        model = build_model(model_config, spec)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config["ds"])
        del model
    else:
        engine, _, _ = build_engine(model_config, spec, config["ds"])
    dtype = torch.bfloat16 if config["ds"]["bf16"]["enabled"] else torch.float32
    generator = torch.Generator().manual_seed(1)  # the same batches in every mode
    for _ in range(config["steps"]):
        x = torch.randn(BATCH, IN, generator=generator).to(dtype)
        y = torch.randint(0, OUT, (BATCH,), generator=generator)
        engine.backward(nn.functional.cross_entropy(engine(x).float(), y))
        engine.step()
    mine = {"peak_rss_mb": _status_mb("VmHWM:"), "before_mb": before, "params": parameter_count(engine.module)}
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return {"workers": everyone}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 (all modes)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the model built whole with DeepSpeed's default buckets and "
                             "torch's foreach AdamW (what stoker did before sizing them)")
    args = parser.parse_args()

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stoker.cluster.connect import connect_embedded
    from stoker.trainer.config import TrainConfig
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.models import check_model

    connect_embedded()
    model_config, spec = model_and_spec()
    import torch

    with torch.device("meta"):
        params = check_model(model_config, spec)
    out: dict = {"params": params, "bf16": args.bf16, "batch": BATCH, "workers": 2}
    storage = tempfile.mkdtemp(prefix="stoker-zero-mem-")

    def measure(stage: int, defaults: bool) -> dict:
        train = TrainConfig(batch_size=BATCH, deepspeed={"zero_stage": stage, "bf16": args.bf16})
        ds = deepspeed_config(train, 2, args.steps, None if defaults else params)
        if defaults:
            ds["optimizer"]["params"].pop("fused", None)
        workers = TorchTrainer(
            worker, train_loop_config={"ds": ds, "steps": args.steps, "defaults": defaults},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"zero{stage}-{'defaults' if defaults else 'stoker'}", storage_path=storage),
        ).fit().return_value["workers"]
        row = {"peak_rss_mb": [round(w["peak_rss_mb"]) for w in workers],
               "added_mb": [round(w["peak_rss_mb"] - w["before_mb"]) for w in workers]}
        print(f"zero{stage} {'deepspeed defaults' if defaults else 'stoker'}: {row}", file=sys.stderr, flush=True)
        return row

    if args.baseline:
        out["deepspeed_defaults"] = {f"zero{s}": measure(s, True) for s in range(4)}
    for stage in range(4):
        out[f"zero{stage}"] = measure(stage, False)
    worst = {s: max(out[f"zero{s}"]["peak_rss_mb"]) for s in range(4)}
    added = {s: max(out[f"zero{s}"]["added_mb"]) for s in range(4)}
    out["ratio_vs_zero0"] = {f"zero{s}": round(worst[s] / worst[0], 3) for s in range(1, 4)}
    out["added_ratio_vs_zero0"] = {f"zero{s}": round(added[s] / added[0], 3) for s in range(1, 4)}
    out["ok"] = all(worst[s] < worst[0] for s in (2, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
