"""Guided backpropagation: hand-computed toy cases, activation handling, the real model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICES
from detector import ScoreConfig, UnsupportedModelError, guided_backprop, guided_feature_response


def _toy(activation: nn.Module, w2=(-1.0, 1.0)) -> nn.Sequential:
    """x=(a,b) -> conv1 (W1=[[1,-1],[2,1]]) -> act -> conv2 (w2) -> act (final conv activations)."""
    conv1 = nn.Conv2d(1, 2, kernel_size=(1, 2), bias=False)
    conv2 = nn.Conv2d(2, 1, kernel_size=1, bias=False)
    with torch.no_grad():
        conv1.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]).view(2, 1, 1, 2))
        conv2.weight.copy_(torch.tensor(w2).view(1, 2, 1, 1))
    return nn.Sequential(conv1, activation, conv2, activation, nn.Flatten())


X = torch.tensor([3.0, 1.0]).view(1, 1, 1, 2)


def test_relu_toy_matches_hand_computation():
    # h = W1 x = (2, 7) > 0; z = -2 + 7 = 5 > 0; seed = relu(z) = 5.
    # Guided: dz = 5; dh = w2*5 = (-5, 5) -> positive part (0, 5); dx = W1^T (0, 5) = (10, 5).
    result = guided_backprop(_toy(nn.ReLU()), X)
    assert result.layer == "2"
    assert result.intercepted == 2
    torch.testing.assert_close(result.response.flatten(), torch.tensor([10.0, 5.0]))
    # Plain gradient of the same seed: dx = W1^T (-5, 5) = (5, 10).
    plain = guided_backprop(_toy(nn.ReLU()), X, guided=False)
    torch.testing.assert_close(plain.response.flatten(), torch.tensor([5.0, 10.0]))


def test_relu6_blocks_gradient_above_six():
    # h = (2, 7): ReLU6 saturates the second unit (7 > 6), so its gradient is blocked;
    # z = -2 + 6 = 4, dh = (-4, 4) -> positive (0, 4) -> masked by saturation -> 0.
    result = guided_backprop(_toy(nn.ReLU6()), X)
    torch.testing.assert_close(result.response.flatten(), torch.tensor([0.0, 0.0]))
    # With w2 = (1, 0): z = 2, dh = (2, 0) -> dx = W1^T (2, 0) = (2, -2).
    result = guided_backprop(_toy(nn.ReLU6(), w2=(1.0, 0.0)), X)
    torch.testing.assert_close(result.response.flatten(), torch.tensor([2.0, -2.0]))


def test_leaky_relu_keeps_slope_on_the_negative_side():
    x = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)  # h = (-2, 5): first unit negative
    # z = 2*0.1*(-2)... use w2=(1,1): z = leaky(-2) + 5 = -0.2 + 5 = 4.8; seed 4.8
    # dh = (4.8, 4.8) -> times f'(h) = (0.1, 1) -> (0.48, 4.8); dx = W1^T dh = (0.48 + 9.6, -0.48 + 4.8)
    result = guided_backprop(_toy(nn.LeakyReLU(0.1), w2=(1.0, 1.0)), x)
    torch.testing.assert_close(result.response.flatten(), torch.tensor([10.08, 4.32]))


def test_smooth_activation_rule_is_derivative_times_positive_gradient():
    model = _toy(nn.SiLU(), w2=(-1.0, 1.0))
    result = guided_backprop(model, X)
    h = torch.tensor([2.0, 7.0])
    z = -F.silu(h[0]) + F.silu(h[1])
    seed = F.silu(z)
    silu_grad = lambda v: torch.sigmoid(v) * (1 + v * (1 - torch.sigmoid(v)))  # noqa: E731
    dz = seed * silu_grad(z)
    dh = (torch.tensor([-1.0, 1.0]) * dz).clamp(min=0) * silu_grad(h)
    expected = torch.tensor([[1.0, -1.0], [2.0, 1.0]]).T @ dh
    torch.testing.assert_close(result.response.flatten(), expected)


class FunctionalNet(nn.Module):
    """Activations as functional calls, one of them in-place style."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, kernel_size=(1, 2), bias=False)
        self.conv2 = nn.Conv2d(2, 1, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]).view(2, 1, 1, 2))
            self.conv2.weight.copy_(torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1))

    def forward(self, x):
        x = F.relu(self.conv1(x), inplace=True)
        return torch.relu(self.conv2(x)).flatten(1)


def test_functional_relu_calls_are_guided():
    result = guided_backprop(FunctionalNet(), X)
    assert result.intercepted == 2
    torch.testing.assert_close(result.response.flatten(), torch.tensor([10.0, 5.0]))


def test_model_is_left_untouched_also_when_forward_raises():
    model = _toy(nn.ReLU(inplace=True))
    before = [(name, type(m), m.inplace if hasattr(m, "inplace") else None) for name, m in model.named_modules()]
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    guided_backprop(model, X)
    with pytest.raises(RuntimeError):
        guided_backprop(model, torch.zeros(1, 3, 1, 2))  # wrong channel count: forward raises
    after = [(name, type(m), m.inplace if hasattr(m, "inplace") else None) for name, m in model.named_modules()]
    assert before == after
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert torch._C._len_torch_function_stack() == 0  # no interception left active
    # Outside the call, the model still computes ordinary gradients: d relu(z)/dx = W1^T w2.
    x = X.clone().requires_grad_(True)
    model(x).sum().backward()
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([1.0, 2.0]))


def test_unsupported_models_say_why():
    scripted = torch.jit.script(_toy(nn.ReLU()))
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        guided_backprop(scripted, X)

    class ClampNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(x).clamp(min=0).flatten(1)

    with pytest.raises(UnsupportedModelError, match="no activation call was intercepted"):
        guided_backprop(ClampNet(), X)
    with pytest.raises(KeyError, match="no module named 'missing'"):
        guided_backprop(_toy(nn.ReLU()), X, layer="missing")


def test_layer_override_and_top_logit_seed():
    model = _toy(nn.ReLU())
    first = guided_backprop(model, X, layer="0")  # seed = the first conv's output h = (2, 7)
    # dh = (2, 7) positive; dx = W1^T (2, 7) = (2 + 14, -2 + 7)
    torch.testing.assert_close(first.response.flatten(), torch.tensor([16.0, 5.0]))
    top = guided_backprop(model, X, seed="top_logit")
    assert top.layer == "logits"
    # top logit = 5 (single output), seed 1 instead of 5: one fifth of the final-conv response.
    torch.testing.assert_close(top.response.flatten(), torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_one_by_one(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval().to(device)
    pixels = torch.rand(4, 3, 16, 16, device=device)
    batched = guided_feature_response(model, pixels)
    single = torch.cat([guided_feature_response(model, pixels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single)


@pytest.mark.slow
def test_efficientnet_lite0_responses(bundled_model, photo_batch):
    modules_before = {name: type(m) for name, m in bundled_model.named_modules()}
    result = guided_backprop(bundled_model, photo_batch)
    assert result.layer == "net._conv_head"
    assert result.intercepted == 33  # stem + 16 blocks' ReLU6 calls + head
    response = result.response
    assert response.shape == photo_batch.shape
    assert torch.isfinite(response).all()
    assert (response.abs().flatten(1).amax(dim=1) > 0).all()
    assert {name: type(m) for name, m in bundled_model.named_modules()} == modules_before
    # The response depends on the input, and the config switch selects top-logit seeding.
    assert not torch.allclose(response[0], response[1])
    top = guided_feature_response(bundled_model, photo_batch[:1], ScoreConfig(seed="top_logit"))
    assert top.shape == (1, 3, 224, 224) and torch.isfinite(top).all() and top.abs().sum() > 0


def test_several_seeds_share_one_forward_and_equal_separate_calls():
    from detector import guided_responses

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU6(), nn.Conv2d(6, 4, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    pixels = torch.rand(3, 3, 12, 12)
    forwards = []
    handle = model[0].register_forward_hook(lambda *args: forwards.append(1))
    responses, logits, names, intercepted = guided_responses(model, pixels, ["1", "3", None])
    handle.remove()
    assert len(forwards) == 1 and intercepted == 3
    assert names == {"1": "1", "3": "3", None: "4"}
    for seed in ("1", "3", None):
        torch.testing.assert_close(responses[seed], guided_backprop(model, pixels, layer=seed).response)
    torch.testing.assert_close(logits, model(pixels))
