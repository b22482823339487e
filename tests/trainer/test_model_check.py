"""The driver's shape check of a built-in model (stoker.trainer.run._check_model)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from stoker.trainer import run as trainer_run
from stoker.trainer.config import ModelConfig
from stoker.trainer.models import InputSpec

TEXT = InputSpec("text", (20,), 4, "classification", vocab_size=50)


@pytest.mark.parametrize("cpu_max", [trainer_run.CPU_CHECK_MAX_PARAMS, 0])  # checked on the CPU / on meta
def test_both_ways_of_checking_count_the_same_parameters(monkeypatch, cpu_max):
    monkeypatch.setattr(trainer_run, "CPU_CHECK_MAX_PARAMS", cpu_max)
    model = ModelConfig(name="transformer", embed_dim=32, num_heads=4, num_layers=2)
    # embedding 50x32, positions, 2 encoder layers, the head: counted from a model built on the CPU.
    expected = sum(p.numel() for p in trainer_run.build_model(model, TEXT).parameters())
    assert trainer_run._check_model(SimpleNamespace(model=model), TEXT) == expected


def test_a_small_model_is_checked_without_importing_torch_dynamo():
    # The meta device's first forward imports torch._dynamo (about 1.8 s); a small model needs none.
    code = (
        "import sys, types\n"
        "from stoker.trainer import run\n"
        "from stoker.trainer.config import ModelConfig\n"
        "from stoker.trainer.models import InputSpec\n"
        "spec = InputSpec('tabular', (12,), 3, 'classification')\n"
        "run._check_model(types.SimpleNamespace(model=ModelConfig(name='mlp', hidden=[32])), spec)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
