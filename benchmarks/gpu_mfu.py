"""Decoder-only Transformer on one NVIDIA GPU with DeepSpeed ZeRO-2 + bf16: tokens/s and MFU.

Model FLOPs per token = 6 x parameters + 12 x layers x sequence x width (the attention
scores and weighted sum, forward + backward), as in the PaLM paper's MFU definition; MFU is
achieved model FLOP/s over the GPU's dense bf16 peak. The baseline in the same run is the
identical model and batches in plain PyTorch (bf16 autocast, AdamW), so the line also shows
what DeepSpeed's engine costs. Without a CUDA GPU it prints {"skipped": ...} and exits 0.
"""

import json
import os
import sys
import time

# Dense bf16 peak TFLOP/s by device-name fragment (vendor datasheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(name: str) -> float | None:
    for fragment, peak in PEAK_TFLOPS.items():
        if fragment in name:
            return peak
    return None


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA GPU available"}))
        return 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    from stoker.trainer.config import ModelConfig, TrainConfig
    from stoker.trainer.deepspeed_config import deepspeed_config
    from stoker.trainer.models import InputSpec, build_model

    seq, vocab, batch, steps, warmup = 1024, 32768, 8, 20, 5
    config = ModelConfig(name="gpt", embed_dim=1024, num_layers=12, num_heads=16)
    spec = InputSpec("text", (seq,), vocab, "language_modeling", vocab)
    train = TrainConfig(batch_size=batch, deepspeed={"zero_stage": 2, "bf16": True},
                        optimizer={"name": "adamw", "lr": 1e-4})
    ds = deepspeed_config(train, 1, steps)
    ds["optimizer"]["params"].pop("torch_adam", None)  # FusedAdam on GPU
    torch.manual_seed(0)
    model = build_model(config, spec)
    params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * params + 12 * config.num_layers * seq * config.embed_dim
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name)

    def measure(step) -> float:
        tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.synchronize()
                started = time.perf_counter()
            step(tokens)
        torch.cuda.synchronize()
        return batch * seq * steps / (time.perf_counter() - started)

    def lm_loss(logits, tokens):
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)

    def ds_step(tokens):
        loss = lm_loss(engine(tokens), tokens)
        engine.backward(loss)
        engine.step()

    ds_tps = measure(ds_step)

    torch.manual_seed(0)
    plain = build_model(config, spec).cuda()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=True)

    def torch_step(tokens):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(plain(tokens), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch_tps = measure(torch_step)
    result = {
        "device": name, "params": params, "seq_len": seq, "batch": batch,
        "deepspeed_zero2_bf16": {"tokens_per_s": round(ds_tps), "mfu": round(ds_tps * flops_per_token / (peak * 1e12), 4) if peak else None},
        "torch_autocast_bf16": {"tokens_per_s": round(torch_tps), "mfu": round(torch_tps * flops_per_token / (peak * 1e12), 4) if peak else None},
        "ratio": round(ds_tps / torch_tps, 3),
        "peak_bf16_tflops": peak,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
