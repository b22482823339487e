"""The model registry: every built-in architecture on synthetic tensors of each modality."""

import sys

import pytest
import torch

from stoker.errors import UserError
from stoker.trainer.config import ModelConfig
from stoker.trainer.models import InputSpec, build_model, check_model

TABULAR = InputSpec("tabular", (12,), 3, "classification")
IMAGE = InputSpec("image", (3, 16, 16), 5, "classification")
TEXT = InputSpec("text", (20,), 4, "classification", vocab_size=50)
LM = InputSpec("text", (24,), 50, "language_modeling", vocab_size=50)
SMALL = {"embed_dim": 32, "hidden_size": 16, "num_heads": 4, "num_layers": 2, "channels": [8, 16]}


@pytest.mark.parametrize(
    ("name", "spec"),
    [("mlp", TABULAR), ("mlp", IMAGE), ("cnn", IMAGE), ("gru", TEXT), ("lstm", TEXT), ("gru", TABULAR),
     ("lstm", IMAGE), ("transformer", TEXT), ("transformer", IMAGE), ("gpt", LM)],
)
def test_builtin_models_fit_their_input_and_learn(name, spec):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, **SMALL), spec)
    x = spec.example(8)
    if spec.modality == "text":
        x = torch.randint(0, spec.vocab_size, x.shape)
    else:
        x = torch.randn(x.shape)
    out = model(x)
    expected = (8, spec.input_shape[0], 50) if spec.task == "language_modeling" else (8, spec.out_features)
    assert tuple(out.shape) == expected
    # A few optimizer steps on a fixed batch must lower the loss: the graph is connected.
    target = x[:, 1:] if spec.task == "language_modeling" else torch.randint(0, spec.out_features, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss():
        o = model(x)
        if spec.task == "language_modeling":
            return torch.nn.functional.cross_entropy(o[:, :-1].reshape(-1, 50), target.reshape(-1))
        return torch.nn.functional.cross_entropy(o, target)

    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="gpt", **SMALL), LM).eval()
    x = torch.randint(0, 50, (1, 24))
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % 50
    a, b = model(x), model(changed)
    # Positions before the changed token cannot see it; positions from it on do.
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-5)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-5)


def test_models_refuse_the_wrong_modality_with_one_line():
    with pytest.raises(UserError, match=r"model.name: cnn needs image data \(\[C, H, W\]\); the dataset is tabular"):
        build_model(ModelConfig(name="cnn"), TABULAR)
    with pytest.raises(UserError, match="model.name: gpt is a language model"):
        build_model(ModelConfig(name="gpt"), TEXT)
    with pytest.raises(UserError, match="model.max_len: 8 is shorter than the dataset's sequences"):
        build_model(ModelConfig(name="transformer", max_len=8, **SMALL), TEXT)


def test_unknown_model_name_is_a_config_error():
    from stoker.config import parse_config

    with pytest.raises(UserError, match=r"^model.name: input should be .*'mlp'.*got 'resnet9000' \(t\)"):
        parse_config({"name": "r", "data": {"source": "x.csv", "label": "y", "output": "o"},
                      "model": {"name": "resnet9000"}}, "t")


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "my_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "def build(spec, width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(spec.in_features, width), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(width, spec.out_features))\n"
        "def not_a_module(spec):\n    return 42\n"
        "def wrong_width(spec):\n    return torch.nn.Linear(spec.in_features + 1, spec.out_features)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_user_model_from_an_import_path(user_package):
    model = build_model(ModelConfig(name="custom", path="my_models:build", options={"width": 5}), TABULAR)
    assert model[0].out_features == 5
    check_model(ModelConfig(name="custom", path="my_models:build"), TABULAR)


@pytest.mark.parametrize(
    ("path", "message"),
    [("no_such_pkg.models:build", "model.path: cannot import 'no_such_pkg.models'"),
     ("my_models:missing", "model.path: 'my_models' has no callable 'missing'"),
     ("my_models:not_a_module", "model.path: my_models:not_a_module returned int, not a torch.nn.Module"),
     ("my_models:wrong_width", r"model: custom does not accept the dataset's input \[2, 12\] \(tabular, from the manifest\)")],
)
def test_user_model_errors_name_the_key(user_package, path, message):
    with pytest.raises(UserError, match=message):
        check_model(ModelConfig(name="custom", path=path), TABULAR)


def test_custom_without_a_path_is_refused():
    with pytest.raises(ValueError, match="model.name custom needs model.path"):
        ModelConfig(name="custom")
