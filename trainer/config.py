"""The `model`, `train` and `scaling` sections of the run config."""

from typing import Literal

from pydantic import Field, model_validator

from stoker.schema import StrictModel


class ModelConfig(StrictModel):
    """Which network to build; its input and output widths come from the dataset manifest."""

    name: Literal["mlp"] = "mlp"
    """Architecture from the built-in registry."""
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    """Widths of the hidden layers."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability after each hidden layer."""

    @model_validator(mode="after")
    def _positive_widths(self) -> "ModelConfig":
        if not self.hidden or any(w <= 0 for w in self.hidden):
            raise ValueError(f"hidden: layer widths must be positive integers, got {self.hidden}")
        return self


class DeepSpeedConfig(StrictModel):
    """How DeepSpeed distributes and runs the model; stoker writes the DeepSpeed JSON from it."""

    zero_stage: int = Field(2, ge=0, le=3)
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also
    parameters."""
    bf16: bool = False
    """Train in bfloat16 (works on CPU and on Ampere+ GPUs)."""
    fp16: bool = False
    """Train in float16 with loss scaling (GPUs only)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated before each optimizer step."""
    gradient_clipping: float = Field(0.0, ge=0)
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload; needs zero_stage >= 1)."""

    @model_validator(mode="after")
    def _consistent(self) -> "DeepSpeedConfig":
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3, got 0")
        return self


class OptimizerConfig(StrictModel):
    """The optimizer DeepSpeed steps."""

    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    """Optimizer algorithm."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """L2 weight decay (decoupled for AdamW)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum for SGD and RMSprop."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW moment decay rates."""


class ScheduleConfig(StrictModel):
    """The learning-rate schedule, stepped once per optimizer step."""

    name: Literal["constant", "warmup_cosine", "warmup_linear"] = "constant"
    """constant: the peak rate throughout; warmup_*: linear warm-up, then cosine or linear
    decay to zero at the end of training."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from zero to the peak rate."""


class TrainConfig(StrictModel):
    """How long and how to train."""

    epochs: int = Field(10, ge=1)
    """Passes over the training split."""
    batch_size: int = Field(64, ge=1)
    """Rows per micro-batch on each worker."""
    seed: int = 0
    """Seed of model initialisation and shuffling; same seed + config + data, same metrics."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Optimizer and its hyperparameters."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    metric: str | None = None
    """Validation metric that picks the best epoch; default `accuracy` (classification) or
    `mse` (regression)."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""


class ScalingConfig(StrictModel):
    """How many Ray Train workers run and what each one reserves."""

    num_workers: int = Field(2, ge=1)
    """Data-parallel training workers (ranks)."""
    use_gpu: bool = False
    """Give each worker GPUs; DeepSpeed then uses NCCL instead of gloo."""
    gpus_per_worker: float = Field(1, gt=0)
    """GPUs reserved per worker when use_gpu is true."""
    cpus_per_worker: float | None = Field(None, gt=0)
    """Logical CPUs reserved per worker; default: an even share of what `data_cpus` leaves."""
    data_cpus: float = Field(1, ge=0)
    """CPUs kept free for Ray Data read tasks. Workers that take every CPU would starve the
    readers and training would wait forever for its first batch."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes; STRICT_SPREAD puts every worker on a different node."""
