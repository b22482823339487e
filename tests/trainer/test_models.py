"""The model registry: every built-in architecture on synthetic tensors of each modality."""

import sys

import pytest
import torch

from stoker.errors import UserError
from stoker.trainer.config import ModelConfig
from stoker.trainer.models import InputSpec, build_model, check_model, resolve_model

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


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [("cnn", TABULAR, r"model.name: cnn does not fit the dataset's modality \(tabular data for classification\); "
                      r"use mlp or gru or lstm or transformer, or leave model.name out for mlp"),
     ("cnn", TEXT, r"cnn does not fit the dataset's modality \(text data for classification\); use gru or lstm or transformer"),
     ("mlp", TEXT, r"mlp does not fit the dataset's modality \(text data for classification\)"),
     ("gpt", TEXT, r"gpt does not fit the dataset's modality \(text data for classification\)"),
     ("gpt", IMAGE, r"gpt does not fit the dataset's modality \(image data for classification\); use mlp or cnn or"),
     ("gru", LM, r"gru does not fit the dataset's modality \(text data for language_modeling\); use gpt, "),
     ("transformer", LM, r"transformer does not fit the dataset's modality \(text data for language_modeling\)")],
)
def test_a_family_that_does_not_fit_the_modality_is_refused_in_one_line(name, spec, message):
    for check in (build_model, check_model):  # the driver's check and every worker's build
        with pytest.raises(UserError, match=message) as error:
            check(ModelConfig(name=name, **SMALL), spec)
        assert "\n" not in str(error.value)


def test_a_sequence_longer_than_the_position_embedding_names_the_key():
    with pytest.raises(UserError, match="model.max_len: 8 is shorter than the dataset's sequences"):
        build_model(ModelConfig(name="transformer", max_len=8, **SMALL), TEXT)
    with pytest.raises(UserError, match="model.max_len: 16 is shorter than the dataset's sequences \\(24\\)"):
        check_model(ModelConfig(name="gpt", max_len=16, **SMALL), LM)


@pytest.mark.parametrize(("spec", "family"),
                         [(TABULAR, "mlp"), (IMAGE, "cnn"), (TEXT, "gru"), (LM, "gpt")])
def test_a_model_left_out_is_the_family_of_the_datasets_modality(spec, family):
    config = ModelConfig(**SMALL)
    assert config.name is None
    assert resolve_model(config, spec).name == family
    model = build_model(config, spec)
    assert type(model) is type(build_model(ModelConfig(name=family, **SMALL), spec))
    assert check_model(config, spec) == sum(p.numel() for p in model.parameters())


def test_a_default_transformer_family_still_checks_its_heads():
    with pytest.raises(UserError, match="model.num_heads: 3 does not divide embed_dim 32 \\(of gpt, the default"):
        resolve_model(ModelConfig(embed_dim=32, num_heads=3), LM)


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


@pytest.mark.parametrize(("size", "pools", "grid"), [(32, 3, 4), (28, 2, 4), (16, 2, 4), (8, 1, 4), (5, 0, 4), (3, 0, 3)])
def test_cnn_pools_down_to_a_grid_not_to_one_pixel(size, pools, grid):
    spec = InputSpec("image", (1, size, size), 10, "classification")
    model = build_model(ModelConfig(name="cnn", channels=[4, 8, 8]), spec)
    assert sum(isinstance(layer, torch.nn.MaxPool2d) for layer in model) == pools
    [head] = [layer for layer in model if isinstance(layer, torch.nn.Linear)]
    assert head.in_features == 8 * grid * grid  # the last block's channels at every grid cell
    assert tuple(model(torch.randn(2, 1, size, size)).shape) == (2, 10)


def test_cnn_learns_where_a_stroke_is_not_only_that_it_is_there():
    # One 3x3 blob per image, top half (class 0) or bottom half (class 1), anywhere along the row:
    # the same blob in both classes. A global average pool of the features cannot tell them apart
    # (the built-in CNN's old head: 0.46 on the digit images); a pooled grid can.
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 16, 16)
    y = torch.arange(64) % 2
    rows = torch.randint(1, 5, (64,), generator=generator) + 9 * y
    cols = torch.randint(0, 13, (64,), generator=generator)
    for i in range(64):
        x[i, 0, rows[i]:rows[i] + 3, cols[i]:cols[i] + 3] = 1.0
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", channels=[4, 8]), InputSpec("image", (1, 16, 16), 2, "classification"))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model.eval()(x).argmax(1) == y).float().mean() > 0.95


def test_the_runs_first_line_says_which_family_was_chosen_and_why(prepared):
    from stoker.config import parse_config
    from stoker.trainer.models import describe_model

    config = {key: value for key, value in prepared.items() if key != "model"}
    run = parse_config(config, "test")
    assert describe_model(run.model, run.data) == "model mlp (the default for tabular data)"
    run = parse_config({**config, "model": {"name": "gru"}}, "test")
    assert describe_model(run.model, run.data) == "model gru"
