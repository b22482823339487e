"""Peak resident memory per worker at ZeRO 0/1/2/3 for a model whose optimizer state dominates.

An MLP of ~38M parameters (fp32 weights 150 MB, gradients 150 MB, AdamW moments 300 MB), two
Ray Train workers, a few AdamW steps on random batches with stoker's generated DeepSpeed
config. Each worker reports its peak RSS (ru_maxrss) and its RSS before the model was built,
so the table shows what training added. ZeRO 1 shards the optimizer state, 2 the gradients
too, 3 the weights too. Prints one JSON line: {"zero0": {"peak_rss_mb", "added_mb"}, ...,
"params": N, "ok": ZeRO 2 and 3 below ZeRO 0}.
"""

import json
import os
import resource
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

WIDTH, DEPTH, IN, OUT, BATCH, STEPS = 4096, 3, 1024, 10, 16, 3


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(config: dict) -> dict:
    import deepspeed
    import torch
    from torch import nn

    before = _rss_mb()
    torch.manual_seed(0)
    layers, width = [], IN
    for _ in range(DEPTH):
        layers += [nn.Linear(width, WIDTH), nn.ReLU()]
        width = WIDTH
    model = nn.Sequential(*layers, nn.Linear(width, OUT))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config["ds"])
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
        engine.backward(nn.functional.cross_entropy(engine(x), y))
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mine = {"peak_rss_mb": peak, "before_mb": before,
            "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return max(everyone, key=lambda r: r["peak_rss_mb"])  # the worst worker


def main() -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stoker.cluster.connect import connect_embedded
    from stoker.trainer.config import TrainConfig
    from stoker.trainer.engine import deepspeed_config

    connect_embedded()
    out: dict = {}
    import tempfile

    storage = tempfile.mkdtemp(prefix="stoker-zero-mem-")
    for stage in (0, 1, 2, 3):
        ds = deepspeed_config(TrainConfig(batch_size=BATCH, deepspeed={"zero_stage": stage}), 2, STEPS)
        record = TorchTrainer(
            worker, train_loop_config={"ds": ds},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"zero{stage}", storage_path=storage, ),
        ).fit().return_value
        out[f"zero{stage}"] = {"peak_rss_mb": round(record["peak_rss_mb"]),
                               "added_mb": round(record["peak_rss_mb"] - record["before_mb"])}
        out["params"] = record["params"]
        print(f"zero{stage}: {out[f'zero{stage}']}", file=sys.stderr, flush=True)
    out["ok"] = all(out[f"zero{s}"]["peak_rss_mb"] < out["zero0"]["peak_rss_mb"] for s in (2, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
