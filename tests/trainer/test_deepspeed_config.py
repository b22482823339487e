"""The DeepSpeed JSON generated from the `train` section."""

from stoker.trainer.config import TrainConfig
from stoker.trainer.deepspeed_config import (
    BUCKET_MAX,
    BUCKET_MIN,
    bucket_elements,
    deepspeed_config,
    optimizer_steps,
)


def test_batch_sizes_multiply_out():
    train = TrainConfig(batch_size=16, deepspeed={"gradient_accumulation_steps": 4, "zero_stage": 3})
    ds = deepspeed_config(train, world_size=2, steps_per_epoch=10)
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 * 4 * 2
    assert ds["zero_optimization"] == {"stage": 3}


def test_optimizers_map_to_deepspeed_and_torch_names():
    adamw = deepspeed_config(TrainConfig(optimizer={"name": "adamw", "lr": 0.01}), 1, 1)["optimizer"]
    assert adamw == {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0, "betas": [0.9, 0.999], "torch_adam": True, "fused": True}}
    sgd = deepspeed_config(TrainConfig(optimizer={"name": "sgd", "momentum": 0.8}), 1, 1)["optimizer"]
    assert sgd["type"] == "SGD" and sgd["params"]["momentum"] == 0.8
    assert deepspeed_config(TrainConfig(optimizer={"name": "rmsprop"}), 1, 1)["optimizer"]["type"] == "RMSprop"
    # ZeRO asserts on torch optimizers it has not tested unless the config allows them.
    assert deepspeed_config(TrainConfig(optimizer={"name": "sgd"}), 1, 1)["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in deepspeed_config(TrainConfig(), 1, 1)


def test_offload_uses_deepspeed_cpu_adam():
    train = TrainConfig(deepspeed={"zero_stage": 2, "offload_optimizer": True})
    ds = deepspeed_config(train, 2, 5)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]


def test_schedules_span_the_whole_run():
    train = TrainConfig(epochs=3, schedule={"name": "warmup_cosine", "warmup_steps": 5})
    sched = deepspeed_config(train, 2, steps_per_epoch=7)["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    assert sched["params"]["total_num_steps"] == 21 and sched["params"]["warmup_num_steps"] == 5
    assert "scheduler" not in deepspeed_config(TrainConfig(), 2, 7)
    assert deepspeed_config(TrainConfig(schedule={"warmup_steps": 3}), 2, 7)["scheduler"]["type"] == "WarmupLR"


def test_precision_blocks():
    assert deepspeed_config(TrainConfig(deepspeed={"bf16": True}), 1, 1)["bf16"] == {"enabled": True}
    assert deepspeed_config(TrainConfig(), 1, 1)["fp16"] == {"enabled": False}


def test_steps_per_epoch_follow_the_equal_split():
    train = TrainConfig(batch_size=32, deepspeed={"gradient_accumulation_steps": 2})
    # 1257 rows over 2 ranks -> 628 each -> 20 micro-batches -> 10 optimizer steps.
    assert optimizer_steps(1257, 2, train) == 10


def test_buckets_are_sized_to_the_model():
    # DeepSpeed's 5e8-element default would be a 2 GB transient buffer; stoker uses an eighth
    # of the model, never below 5e6 (one collective for small models) nor above the default.
    assert bucket_elements(40_000_000) == BUCKET_MIN
    assert bucket_elements(400_000_000) == 50_000_000
    assert bucket_elements(10**11) == BUCKET_MAX
    zero2 = deepspeed_config(TrainConfig(deepspeed={"zero_stage": 2}), 2, 1, param_count=400_000_000)["zero_optimization"]
    assert zero2 == {"stage": 2, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    zero3 = deepspeed_config(TrainConfig(deepspeed={"zero_stage": 3}), 2, 1, param_count=400_000_000)["zero_optimization"]
    # ZeRO-3 does not keep the whole gathered model alive between forward and backward.
    assert zero3["stage3_max_live_parameters"] == 50_000_000 and zero3["stage3_max_reuse_distance"] == 50_000_000
    assert deepspeed_config(TrainConfig(deepspeed={"zero_stage": 0}), 2, 1, param_count=400_000_000)["zero_optimization"] == {"stage": 0}
