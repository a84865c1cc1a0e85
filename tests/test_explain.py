"""`advsentry explain`: CAM equals a hand computation, the promotion–suppression category is right, the page is
self-contained and says which reference it used."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from detector.explain import categorize, class_activation_maps, grad_cam, promotion_suppression


class GapNet(nn.Module):
    """conv → ReLU → conv → ReLU → global average pool → linear: the head CAM is exact for."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class FlatNet(nn.Module):
    """No global-average-pool head: CAM does not apply, Grad-CAM does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def gap_net() -> GapNet:
    torch.manual_seed(0)
    return GapNet().eval()


def test_cam_equals_hand_computation(gap_net):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    result = class_activation_maps(gap_net, x, top=2)
    assert result.method == "cam" and result.layer == "pool"
    with torch.no_grad():
        features = gap_net.features(x)  # [2, 4, 8, 8]
        logits = gap_net(x)
    weight, bias = gap_net.fc.weight.detach(), gap_net.fc.bias.detach()
    for b in range(2):
        top2 = torch.argsort(logits[b], descending=True)[:2]
        assert result.classes[b].tolist() == top2.tolist()
        for j, k in enumerate(top2.tolist()):
            hand = sum(weight[k, c] * features[b, c] for c in range(4))
            torch.testing.assert_close(result.maps[b, j], hand, rtol=1e-5, atol=1e-6)
            # the defining property of CAM: the map's mean plus the bias is the class logit
            torch.testing.assert_close(hand.mean() + bias[k], logits[b, k], rtol=1e-5, atol=1e-5)


def test_cam_of_chosen_classes_and_grad_cam_agreement(gap_net):
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cam = class_activation_maps(gap_net, x, torch.tensor([[3, 0]]))
    assert cam.classes.tolist() == [[3, 0]]
    # For a GAP → linear head ∂logit/∂A is W/(h·w) everywhere, so Grad-CAM = ReLU(CAM) / (h·w).
    gcam = grad_cam(gap_net, x, torch.tensor([[3, 0]]), layer="features.3")
    torch.testing.assert_close(gcam.maps, torch.relu(cam.maps) / 64, rtol=1e-4, atol=1e-6)


def test_grad_cam_fallback_without_gap_head():
    torch.manual_seed(0)
    net = FlatNet().eval()
    x = torch.rand(1, 3, 8, 8)
    result = class_activation_maps(net, x, top=2)
    assert result.method == "grad-cam" and result.maps.shape == (1, 2, 8, 8)
    assert (result.maps >= 0).all()
    with pytest.raises(ValueError, match="Grad-CAM"):
        class_activation_maps(net, x, method="cam")


@pytest.mark.parametrize(
    ("delta_true", "delta_adv", "expected"),
    [
        (-3.0, 0.5, "suppression-dominated"),  # share 0.5/3.5 = 0.14
        (-0.4, 2.0, "promotion-dominated"),  # share 2/2.4 = 0.83
        (-1.0, 1.2, "balanced"),  # share 0.55
        (-1.0, 2.0, "promotion-dominated"),  # share exactly 2/3: at least twice the other
        (-2.0, 1.0, "suppression-dominated"),  # share exactly 1/3
        (0.5, 2.0, "promotion-dominated"),  # true class even rose: all promotion
        (-2.0, -0.5, "suppression-dominated"),  # adversarial class fell: all suppression
    ],
)
def test_pse_category_of_constructed_logit_changes(delta_true, delta_adv, expected):
    category, suppression, promotion, share = categorize(delta_true, delta_adv)
    assert category == expected
    assert suppression == max(0.0, -delta_true) and promotion == max(0.0, delta_adv)


def test_pse_from_logit_vectors():
    reference = np.array([5.0, 1.0, 0.0, 0.0])  # true class 0
    suppressed = np.array([0.5, 1.5, 0.0, 0.0])  # class 0 falls by 4.5, class 1 rises by 0.5
    result = promotion_suppression(reference, suppressed, centre=False)
    assert (result.true_class, result.adversarial_class) == (0, 1)
    assert result.delta_true_logit == pytest.approx(-4.5) and result.delta_adversarial_logit == pytest.approx(0.5)
    assert result.category == "suppression-dominated"
    assert result.p_true_input < result.p_true_reference and result.p_adversarial_input > result.p_adversarial_reference
    promoted = np.array([5.0, 6.0, 0.0, 0.0])
    assert promotion_suppression(reference, promoted, centre=False).category == "promotion-dominated"
    # A uniform shift of every logit changes no probability: with centring it is neither effect.
    shifted = promoted - 10.0
    assert promotion_suppression(reference, shifted, centre=False).category == "suppression-dominated"
    assert promotion_suppression(reference, shifted).category == promotion_suppression(reference, promoted).category
    assert promotion_suppression(reference, reference + 0.1).category == "no label change"
    assert "0.667" in result.rule and "0.333" in result.rule


@pytest.mark.slow
def test_explain_page_with_reference_and_estimate(tmp_path, bundled_model):
    """On the bundled model: an FGSM photo against its clean original, then with no reference (estimate)."""
    from PIL import Image
    from typer.testing import CliRunner

    from detector.samples import full_photo_samples, to_tensor
    from service.cli import app

    clean = to_tensor([full_photo_samples()[1].pixels()])
    x = clean.clone().requires_grad_(True)
    logits = bundled_model(x)
    torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
    adversarial = ((x + 4 / 255 * x.grad.sign()).clamp(0, 1) * 255).round().detach() / 255
    files = {}
    for name, pixels in (("clean", clean), ("adv", adversarial)):
        files[name] = tmp_path / f"{name}.png"
        Image.fromarray((pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(files[name])

    runner = CliRunner()
    result = runner.invoke(app, ["explain", str(files["adv"]), "--reference", str(files["clean"]),
                                 "--out", str(tmp_path / "given"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    pse = summary["promotion_suppression"]
    assert summary["reference"] == "given"
    assert pse["true_class"] != pse["adversarial_class"], "FGSM at 4/255 changes the cat's label"
    assert pse["category"] in ("suppression-dominated", "promotion-dominated", "balanced")
    assert summary["cam"]["method"] == "cam" and len(summary["cam"]["classes"]) == 2
    # the score on the page is the detector's score of the same pixels
    from detector import Detector

    expected = float(Detector.default(load_model=True).score(to_tensor([np.asarray(Image.open(files["adv"]))]))[0])
    assert summary["score"] == pytest.approx(expected, abs=1e-5)
    page = (tmp_path / "given" / "index.html").read_text()
    assert pse["category"] in page and "share ≥ 0.667" in page
    assert not re.search(r'src="(?!data:)', page), "the page must embed its images"
    assert page.count("data:image/png;base64,") == 3
    for png in ("response.png", "cam.png", "pse.png"):
        assert (tmp_path / "given" / png).stat().st_size < 300_000

    result = runner.invoke(app, ["explain", str(files["adv"]), "--out", str(tmp_path / "estimate"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["reference"] == "estimate"
    page = (tmp_path / "estimate" / "index.html").read_text()
    assert "No clean reference was given" in page and "estimate" in page


def test_explain_cli_usage_errors(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["explain", "--out", str(tmp_path)]).exit_code == 2
    assert runner.invoke(app, ["explain", "--capture", str(tmp_path), "--out", str(tmp_path)]).exit_code == 2
    missing = runner.invoke(app, ["explain", str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 3
