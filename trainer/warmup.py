"""Build DeepSpeed's JIT extensions once, at install time, instead of inside the first run.

On CPU, DeepSpeed compiles a shared-memory comm extension at its first comm init and `cpu_adam`
for optimizer offload (g++ + ninja, about a minute each the first time). Both are cached under
~/.cache/torch_extensions, so `make install` runs this and later runs and tests load them.
"""

import time

from deepspeed.accelerator import get_accelerator


def warm() -> None:
    builders = get_accelerator().op_builder_dir()
    module = __import__(builders, fromlist=["ShareMemCommBuilder", "CPUAdamBuilder"])
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        started = time.perf_counter()
        getattr(module, name)().load(verbose=False)
        print(f"deepspeed extension {name}: ready in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    warm()
