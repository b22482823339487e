"""The `model`, `train` and `scaling` sections of the run config."""

from typing import Any, Literal

from pydantic import Field, model_validator

from stoker.strict_model import StrictModel

MODEL_NAMES = ("mlp", "cnn", "gru", "lstm", "transformer", "gpt", "custom")


class ModelConfig(StrictModel):
    """Which network to build; its input and output shapes come from the dataset manifest.

    One `name` picks the architecture; each architecture reads the fields listed for it and
    ignores the rest, so a config can switch architectures by changing one line.
    """

    name: Literal["mlp", "cnn", "gru", "lstm", "transformer", "gpt", "custom"] | None = None
    """Architecture: mlp (tabular), cnn (images), gru/lstm and transformer (sequences or text
    classification/regression), gpt (decoder-only language model), custom (`model.path`). Left
    out: the family that suits the prepared dataset (mlp for tables, cnn for images, gru for text
    classification/regression, gpt for language modelling), said in the run's first line."""
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    """mlp: widths of the hidden layers."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability (mlp: after each hidden layer; others: inside blocks and before the
    output head)."""
    channels: list[int] = Field(default_factory=lambda: [32, 64])
    """cnn: output channels of each conv block (conv 3x3, batch norm, ReLU, 2x2 max-pool)."""
    hidden_size: int = Field(128, ge=1)
    """gru/lstm: hidden units per direction."""
    num_layers: int = Field(2, ge=1)
    """gru/lstm/transformer/gpt: stacked recurrent layers or Transformer blocks."""
    bidirectional: bool = False
    """gru/lstm: read the sequence in both directions."""
    embed_dim: int = Field(128, ge=1)
    """transformer/gpt (and gru/lstm on text): token embedding / model width."""
    num_heads: int = Field(4, ge=1)
    """transformer/gpt: attention heads; must divide `embed_dim`."""
    ff_dim: int | None = Field(None, ge=1)
    """transformer/gpt: feed-forward width; default 4 x embed_dim."""
    max_len: int | None = Field(None, ge=1)
    """transformer/gpt: longest sequence the position embedding covers; default the dataset's
    sequence length."""
    path: str | None = None
    """custom: `package.module:function` that builds the model. It is called as
    `function(spec, **options)` with a `stoker.trainer.models.InputSpec` (modality,
    input_shape, out_features, vocab_size, task) and must return a `torch.nn.Module` whose
    forward takes one batch tensor and returns [batch, out_features] outputs
    ([batch, length, vocab] logits for language modelling)."""
    options: dict = Field(default_factory=dict)
    """custom: keyword arguments passed to the `path` function."""

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if not self.hidden or any(w <= 0 for w in self.hidden):
            raise ValueError(f"hidden: layer widths must be positive integers, got {self.hidden}")
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels: must be positive integers, got {self.channels}")
        if self.name in ("transformer", "gpt") and self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        if self.name == "custom" and not self.path:
            raise ValueError("path: model.name custom needs model.path, e.g. my_pkg.models:build")
        if self.path and ":" not in self.path:
            raise ValueError(f"path: expected package.module:function, got {self.path!r}")
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
    """Optimizer algorithm (sgd is SGD with momentum)."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled for AdamW, added to the gradient for the others)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum for SGD and RMSprop."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW moment decay rates."""


class ScheduleConfig(StrictModel):
    """The learning-rate schedule."""

    name: Literal["constant", "warmup_cosine", "warmup_linear", "step", "plateau"] = "constant"
    """constant: the peak rate throughout; warmup_cosine / warmup_linear: linear warm-up, then
    cosine or linear decay to zero at the end of training (DeepSpeed schedulers, in the
    written DeepSpeed JSON); step: multiply the rate by `gamma` every `step_epochs` epochs;
    plateau: multiply it by `gamma` when the validation metric has not improved for
    `patience` epochs (step and plateau are applied by stoker between optimizer steps)."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from zero to the peak rate."""
    step_epochs: int = Field(10, ge=1)
    """step: epochs between decays."""
    gamma: float = Field(0.1, gt=0, lt=1)
    """step/plateau: factor the rate is multiplied by at each decay."""
    patience: int = Field(2, ge=0)
    """plateau: epochs without improvement of `train.metric` before the rate decays."""
    min_lr: float = Field(0.0, ge=0)
    """step/plateau: the rate never decays below this."""


class LossConfig(StrictModel):
    """The training loss and explicit regularisation penalties."""

    name: Literal["auto", "cross_entropy", "bce", "mse", "huber"] = "auto"
    """auto: cross_entropy for classification and language modelling, mse for regression.
    bce (binary cross-entropy on one logit) needs exactly 2 classes."""
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    """Cross-entropy/bce class weights: none; balanced (n_rows / (n_classes x class rows),
    from the training split's class counts in the manifest); or one weight per class in
    the manifest's class order."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Cross-entropy label smoothing."""
    huber_delta: float = Field(1.0, gt=0)
    """Huber loss: where the loss turns from quadratic to linear."""
    l1: float = Field(0.0, ge=0)
    """Coefficient of the L1 penalty (sum of |w|) added to the loss."""
    l2: float = Field(0.0, ge=0)
    """Coefficient of the L2 penalty (sum of w^2) added to the loss; `optimizer.weight_decay`
    is the decoupled alternative."""


class EarlyStoppingConfig(StrictModel):
    """Stop when `train.metric` stops improving on the validation split."""

    patience: int | None = Field(None, ge=1)
    """Validations without an improvement larger than `min_delta` before training stops; null
    never stops early."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change of the metric that counts as an improvement."""


class CheckpointConfig(StrictModel):
    """Which checkpoints the run keeps."""

    keep: int = Field(2, ge=1)
    """Checkpoints kept. The best epoch's (by `train.metric`, on a tie the lower validation
    loss) always ranks first and is never deleted; the latest is always kept as well, for
    resume; the others are the most recent."""
    every: int = Field(1, ge=1)
    """Save a checkpoint every N epochs. The best epoch so far and the last epoch are always
    saved; metrics are reported every epoch either way. A resumed run (or a restart after a
    worker died) continues from the latest saved checkpoint."""


class TrackingConfig(StrictModel):
    """Experiment tracking. TensorBoard event files are always written to
    `<run dir>/tensorboard`."""

    mlflow: bool = False
    """Also log params and per-epoch metrics to MLflow, from the driver (rank 0's numbers, once
    per epoch; a resumed run continues the same MLflow run). Needs `pip install
    'stoker[mlflow]'` (mlflow-skinny)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (`http(s)://...` server, `sqlite:///...`, `databricks`, ...);
    default a local SQLite store, `<run dir>/mlflow.db` (MLflow's `./mlruns` file store is in
    maintenance mode). Credentials come from MLflow's environment variables
    (MLFLOW_TRACKING_TOKEN, ...), never from the config."""


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
    loss: LossConfig = Field(default_factory=LossConfig)
    """Loss function, class weights, label smoothing and L1/L2 penalties."""
    metric: str | None = None
    """Validation metric that picks the best epoch and drives early stopping and the plateau
    schedule; default `accuracy` (classification), `mse` (regression) or `perplexity`
    (language modelling)."""
    validate_every_steps: int | None = Field(None, ge=1)
    """Also validate every N optimizer steps inside an epoch (logged to TensorBoard and
    metrics.jsonl under `step_validations`); validation always runs at each epoch's end."""
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    """Early stopping on `metric`."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint retention."""
    max_failures: int = Field(2, ge=-1)
    """Times Ray Train restarts the worker group from the latest checkpoint after a worker
    dies; -1 retries forever, 0 fails at the first loss."""
    collective_timeout_s: float = Field(600, gt=0)
    """Seconds any collective of the training workers (a gradient all-reduce, a metric gather,
    the per-epoch report barrier) may wait for the other ranks. One that does not complete in
    time fails the attempt with one line naming the ranks that did not arrive, and the run
    restarts from its latest checkpoint (counted against `max_failures`). The default, 10
    minutes, is DeepSpeed's and NCCL's own: far above any healthy step or checkpoint wait,
    yet a third of the 30 minutes a hung gloo or Ray Train collective would otherwise idle
    the accelerators."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """TensorBoard/MLflow logging."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if (self.loss.l1 or self.loss.l2) and self.deepspeed.zero_stage == 3:
            # ZeRO-3 partitions the parameters, so no rank holds the full weights to penalise.
            raise ValueError("loss.l1/l2 penalties need zero_stage 0-2 (ZeRO-3 partitions the "
                             "weights); use optimizer.weight_decay instead")
        return self


class ScalingConfig(StrictModel):
    """How many Ray Train workers run and what each one reserves."""

    num_workers: int = Field(2, ge=1)
    """Data-parallel training workers (ranks). `[min, max]` makes the run elastic: it starts as
    soon as `min` workers fit, grows towards `max` as nodes join, and goes on with fewer when a
    node is drained or lost; each resize resumes from the latest checkpoint at the new size.
    The batch per worker stays `train.batch_size`, so the global batch follows the workers."""
    min_workers: int | None = Field(None, ge=1)
    """The smallest world size of an elastic run (what `num_workers: [min, max]` sets); None:
    a fixed size of `num_workers`."""
    grow_check_s: float = Field(60, gt=0)
    """Elastic runs: seconds between Ray Train's checks for room to grow. Growing restarts the
    workers from the latest checkpoint, so the steps since that checkpoint are run again."""
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
    @model_validator(mode="before")
    @classmethod
    def _elastic_range(cls, data: Any) -> Any:
        workers = data.get("num_workers") if isinstance(data, dict) else None
        if isinstance(workers, (list, tuple)):
            if len(workers) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) for w in workers):
                raise ValueError(f"num_workers: {list(workers)} is not [min, max] (two whole numbers)")
            low, high = workers
            if low > high:
                raise ValueError(f"num_workers: [{low}, {high}]: min is larger than max")
            if data.get("min_workers") is not None:
                raise ValueError("num_workers: [min, max] and min_workers both set; keep one")
            data = {**data, "num_workers": high, "min_workers": low}
        return data

    @model_validator(mode="after")
    def _min_below_max(self) -> "ScalingConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers: {self.min_workers} is larger than num_workers {self.num_workers}")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    memory_per_worker_gb: float | None = Field(None, gt=0)
    """Memory (GiB) each worker's pod gets on Kubernetes (`stoker k8s render` sizes the worker
    pods with it); default: the overlay's node memory shared among the workers of a pod."""
