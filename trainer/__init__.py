"""stoker.trainer: the Ray Train worker loop, DeepSpeed engine, models, metrics, checkpoints."""
