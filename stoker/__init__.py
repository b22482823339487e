"""stoker: a distributed training cluster runtime (Ray Data -> Ray Train + DeepSpeed -> Ray Tune)."""

__version__ = "0.1.0"
