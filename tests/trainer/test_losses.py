"""Losses, class weights from the manifest's counts, label smoothing, penalties."""

import pytest
import torch
import torch.nn.functional as F

from stoker.errors import UserError
from stoker.trainer.config import LossConfig, TrainConfig
from stoker.trainer.losses import build_loss, class_weights, penalty, resolve_name


def test_balanced_weights_follow_the_training_class_counts():
    weights = class_weights(LossConfig(class_weights="balanced"), ["a", "b", "c"], {"a": 60, "b": 30, "c": 10})
    # n / (k * n_c): 100/(3*60), 100/(3*30), 100/(3*10)
    assert weights == pytest.approx([100 / 180, 100 / 90, 100 / 30])
    assert class_weights(LossConfig(), ["a"], {"a": 1}) is None
    with pytest.raises(UserError, match=r"train.loss.class_weights: 2 weights for 3 classes \(a, b, c\)"):
        class_weights(LossConfig(class_weights=[1.0, 2.0]), ["a", "b", "c"], None)


def test_weighted_cross_entropy_with_label_smoothing_matches_torch():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 3), torch.randint(0, 3, (16,))
    fn = build_loss(LossConfig(label_smoothing=0.1), "classification", [1.0, 2.0, 0.5])
    expected = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
    assert fn(logits, target).item() == pytest.approx(expected.item())
    # Up-weighting the class the model gets wrong must raise the loss.
    plain = build_loss(LossConfig(), "classification", None)(logits, target)
    assert fn(logits, target).item() != pytest.approx(plain.item())


def test_bce_weighted_mean():
    logits, target = torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 0, 0])
    fn = build_loss(LossConfig(name="bce"), "classification", [1.0, 3.0])
    per_row = F.binary_cross_entropy_with_logits(logits.flatten(), target.float(), reduction="none")
    w = torch.tensor([3.0, 1.0, 1.0])
    assert fn(logits, target).item() == pytest.approx(((per_row * w).sum() / w.sum()).item())


def test_regression_losses_and_language_model_shift():
    out, y = torch.tensor([[1.0], [4.0]]), torch.tensor([1.0, 1.0])
    assert build_loss(LossConfig(), "regression", None)(out, y).item() == pytest.approx(4.5)
    assert build_loss(LossConfig(name="huber", huber_delta=1.0), "regression", None)(out, y).item() == pytest.approx(1.25)
    tokens = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 5), -10.0)
    logits[0, 0, 2] = logits[0, 1, 3] = 10.0  # position t predicts token t+1 perfectly
    assert build_loss(LossConfig(), "language_modeling", None)(logits, tokens).item() < 1e-3


def test_loss_must_fit_the_task():
    with pytest.raises(UserError, match="train.loss.name: mse does not fit task classification; use cross_entropy or bce"):
        resolve_name(LossConfig(name="mse"), "classification")
    assert resolve_name(LossConfig(), "regression") == "mse"


def test_penalties_skip_biases_and_are_refused_under_zero3():
    weight, bias = torch.tensor([[1.0, -2.0]]), torch.tensor([5.0])
    assert penalty(LossConfig(l1=0.5, l2=0.1), [weight, bias]).item() == pytest.approx(0.5 * 3 + 0.1 * 5)
    assert penalty(LossConfig(), [weight]) is None
    with pytest.raises(ValueError, match="loss.l1/l2 penalties need zero_stage 0-2"):
        TrainConfig(loss={"l2": 0.01}, deepspeed={"zero_stage": 3})


def test_language_model_loss_ignores_padding():
    # Two real tokens then padding (id 0): only the real next-token prediction counts, so
    # however the model scores pad-after-pad, the loss is that of the one real target.
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    tokens = torch.tensor([[3, 4, 0, 0, 0]])
    loss = build_loss(LossConfig(), "language_modeling", None)(logits, tokens)
    real = F.cross_entropy(logits[0, :1], tokens[0, 1:2])
    # The step from the last token to the first pad is not counted either: padding is not text.
    assert loss.item() == pytest.approx(real.item(), rel=1e-6)
    # A batch with nothing to predict (one-token rows) is a zero loss, not NaN.
    assert build_loss(LossConfig(), "language_modeling", None)(logits, torch.tensor([[3, 0, 0, 0, 0]])).item() == 0.0
