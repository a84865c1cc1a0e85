"""Tests for the attack generators in ``detector/attacks``.

Expensive and query-based attacks run against a small CNN trained here in a
couple of seconds on synthetic oriented gratings (32x32, 10 classes); FGSM,
PGD and DeepFool also run on the real EfficientNet-Lite0 (``slow``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import DEVICES
from detector.attacks import ATTACKS, PAPER_ATTACKS, QueryModel, make_attack
from detector.attacks.common import is_on_grid, isolated_rng, perturbation_norms, quantize
from detector.attacks.io import save_adversarial_set

CLASSES = 10


class SmallCNN(nn.Module):
    """Two strided convs, global pooling, linear head: milliseconds per batch on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, CLASSES)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


def gratings(count: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a coloured sine grating at angle k*18 degrees, random phase, light noise; on the 8-bit grid."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = labels.float() * math.pi / CLASSES
    frequency = 3.0 + (labels % 3).float()
    phase = torch.rand(count, generator=generator) * 2 * math.pi
    along = xs[None] * torch.cos(angle)[:, None, None] + ys[None] * torch.sin(angle)[:, None, None]
    wave = torch.sin(frequency[:, None, None] * math.pi * along + phase[:, None, None])
    colour = torch.stack([(labels >> bit) % 2 for bit in range(3)], dim=1).float() * 0.6 + 0.2
    images = 0.5 + 0.35 * wave[:, None] * colour[:, :, None, None]
    images = images + 0.05 * torch.randn(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).round() / 255, labels


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while this module runs (restored after).

    These attacks make thousands of small forward passes; on a shared 2-core
    machine torch's second thread spin-waits on a busy core and made some
    tests 10-40x slower than with one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train_small_model() -> SmallCNN:
    """About two seconds of Adam on 2048 gratings; classifies held-out gratings perfectly."""
    torch.manual_seed(0)
    model = SmallCNN()
    images, labels = gratings(2048, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 128):
            index = order[start : start + 128]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def small_model() -> SmallCNN:
    return train_small_model()


def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(dim=1)


@pytest.fixture(scope="module")
def batch(small_model) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight held-out gratings and the model's labels for them (it gets nearly all right)."""
    images, truth = gratings(8, seed=7)
    labels = predict(small_model, images)
    assert (labels == truth).sum() >= 7
    return images, labels


@pytest.fixture(scope="module")
def near_boundary(small_model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Blends of two gratings right next to the decision boundary, for the one-pixel attack."""
    images, _ = batch
    first, second = images[:4], images[4:]
    start_label = predict(small_model, first)
    low, high = torch.zeros(4), torch.ones(4)
    for _ in range(12):
        middle = (low + high) / 2
        same = predict(small_model, first + middle.view(-1, 1, 1, 1) * (second - first)) == start_label
        low, high = torch.where(same, middle, low), torch.where(same, high, middle)
    blends = ((first + low.view(-1, 1, 1, 1) * (second - first)) * 255).round() / 255
    return blends, predict(small_model, blends)


def counted(model: nn.Module) -> QueryModel:
    """Prediction-only access through a plain function: no module, no gradients to reach."""

    def remote_predict(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images)

    return QueryModel(remote_predict, max_batch=64)


# --- registry ---------------------------------------------------------------------


def test_registry_lists_every_attack_with_family_library_and_defaults():
    expected = {
        "fgsm", "gradient_l2", "one_pixel", "deepfool", "boundary", "pgd_linf", "pgd_l2", "cw_l2",
        "hopskipjump", "square", "universal", "fooling_direct", "fooling_cppn",
    }  # fmt: skip
    assert set(ATTACKS) == expected
    assert set(PAPER_ATTACKS) <= expected
    for name, cls in ATTACKS.items():
        assert cls.name == name
        assert cls.family in ("white_box", "black_box_probing", "universal", "fooling")
        assert cls.library and cls.__doc__ and isinstance(dict(cls.defaults), dict)


def test_make_attack_rejects_unknown_names_params_and_unsupported_modes(small_model):
    with pytest.raises(KeyError, match="unknown attack"):
        make_attack("nope", small_model)
    with pytest.raises(TypeError, match="unknown parameter"):
        make_attack("fgsm", small_model, epsilon=0.1)
    with pytest.raises(ValueError, match="no targeted variant"):
        make_attack("deepfool", small_model, targeted=True)
    with pytest.raises(TypeError, match="white-box"):
        make_attack("pgd_linf", counted(small_model))
    with pytest.raises(ValueError, match="target_labels"):
        make_attack("fgsm", small_model, targeted=True)(torch.zeros(1, 3, 32, 32), torch.zeros(1))


# --- white box ----------------------------------------------------------------------

BUDGETED = [
    ("fgsm", {"eps": 8 / 255}, "linf"),
    ("pgd_linf", {"eps": 8 / 255, "steps": 10}, "linf"),
    ("gradient_l2", {"eps": 1.0}, "l2"),
    ("pgd_l2", {"eps": 1.0, "steps": 10}, "l2"),
]


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("name,params,norm", BUDGETED)
def test_budgeted_white_box_attacks_fool_within_budget(small_model, batch, name, params, norm, quantized):
    images, labels = batch
    result = make_attack(name, small_model, quantize=quantized, **params)(images, labels)
    assert result.success.sum() > 0
    assert torch.equal(result.success, result.labels_after != labels)
    assert torch.equal(result.labels_after, predict(small_model, result.adversarial))
    assert torch.equal(result.labels_before, labels)
    assert float(result.norms[norm].max()) <= params["eps"] + 1e-6
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    assert result.queries is None
    if quantized:
        assert is_on_grid(result.adversarial).all()


def test_channels_last_inputs_are_accepted(small_model, batch):
    images, labels = batch
    channels_last = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # like samples.to_tensor
    assert not channels_last.is_contiguous()
    result = make_attack("gradient_l2", small_model)(channels_last, labels)
    assert torch.equal(result.adversarial, make_attack("gradient_l2", small_model)(images, labels).adversarial)


@pytest.mark.parametrize("name", ["fgsm", "pgd_linf", "pgd_l2"])
def test_targeted_white_box_attacks_reach_the_target(small_model, batch, name):
    images, labels = batch
    targets = (labels + 1) % CLASSES
    eps = {"fgsm": 32 / 255, "pgd_linf": 16 / 255, "pgd_l2": 3.0}[name]
    result = make_attack(name, small_model, targeted=True, eps=eps)(images, labels, targets)
    assert result.success.sum() > 0
    assert torch.equal(result.success, result.labels_after == targets)
    assert result.target_confidence is not None and torch.all(result.target_confidence[result.success] > 0.1)


def test_deepfool_crosses_the_nearest_boundary(small_model, batch):
    images, labels = batch
    images, labels = images[:4], labels[:4]
    result = make_attack("deepfool", small_model, steps=20, candidates=5)(images, labels)
    assert result.success.all()
    # DeepFool is minimal: far smaller than the gradient attacks' budgets on average.
    assert float(result.norms["l2"].median()) < 3.0


def test_carlini_wagner_untargeted_and_targeted(small_model, batch):
    images, labels = batch
    images, labels = images[:2], labels[:2]
    fast = {"binary_search_steps": 2, "max_iter": 10, "learning_rate": 0.1}
    untargeted = make_attack("cw_l2", small_model, **fast)(images, labels)
    assert untargeted.success.sum() > 0
    targets = (labels + 1) % CLASSES
    targeted = make_attack("cw_l2", small_model, targeted=True, **fast)(images, labels, targets)
    assert targeted.success.sum() > 0
    assert torch.all(targeted.labels_after[targeted.success] == targets[targeted.success])


# --- black box, probing -----------------------------------------------------------------


def test_one_pixel_changes_exactly_one_pixel(small_model, near_boundary):
    images, labels = near_boundary
    model = counted(small_model)
    result = make_attack("one_pixel", model, popsize=40, max_iter=8, quantize=True)(images, labels)
    assert result.success.sum() > 0
    assert torch.all(result.norms["l0"] <= 1) and torch.all(result.norms["l0"][result.success] == 1)
    assert is_on_grid(result.adversarial).all()
    assert result.queries is not None and float(result.queries.sum()) == model.queries


def test_one_pixel_stops_early_once_the_true_class_is_below_the_threshold(small_model, near_boundary):
    images, labels = near_boundary
    loose = make_attack("one_pixel", small_model, popsize=40, max_iter=8, stop_probability=0.6)(images, labels)
    strict = make_attack("one_pixel", small_model, popsize=40, max_iter=8, stop_probability=0.0)(images, labels)
    assert torch.all(loose.queries <= strict.queries) and loose.queries.sum() < strict.queries.sum()


@pytest.mark.parametrize("name,params", [("boundary", {"max_iter": 30}), ("hopskipjump", {"max_iter": 3, "max_eval": 100, "init_eval": 20})])
def test_decision_attacks_use_only_counted_predictions(small_model, batch, name, params):
    images, labels = batch
    images, labels = images[:3], labels[:3]
    model = counted(small_model)
    result = make_attack(name, model, **params)(images, labels)
    assert result.success.all()
    assert result.queries is not None and torch.all(result.queries > 0)
    assert float(result.queries.sum()) == model.queries


@pytest.mark.parametrize("name,params", [("deepfool", {}), ("boundary", {"max_iter": 20}), ("cw_l2", {"binary_search_steps": 1, "max_iter": 5})])
def test_minimal_perturbation_attacks_survive_8bit_rounding(small_model, batch, name, params):
    images, labels = batch
    floating = make_attack(name, small_model, **params)(images, labels)
    rounded = make_attack(name, small_model, quantize=True, **params)(images, labels)
    assert is_on_grid(rounded.adversarial).all()
    assert torch.all(rounded.success[floating.success])  # rounding undoes none of them


def test_hopskipjump_targeted(small_model, batch):
    images, labels = batch
    images, labels = images[:2], labels[:2]
    targets = (labels + 3) % CLASSES
    attack = make_attack("hopskipjump", counted(small_model), targeted=True, max_iter=3, max_eval=100, init_eval=20)
    result = attack(images, labels, targets)
    assert result.success.sum() > 0


def test_square_attack_within_linf_budget_and_query_budget(small_model, batch):
    images, labels = batch
    model = counted(small_model)
    eps = 16 / 255
    result = make_attack("square", model, eps=eps, n_queries=150, quantize=True)(images, labels)
    assert result.success.sum() > 0
    assert float(result.norms["linf"].max()) <= eps + 1e-6
    assert torch.all(result.queries <= 151) and float(result.queries.sum()) == model.queries
    assert is_on_grid(result.adversarial).all()


# --- universal ------------------------------------------------------------------


def test_universal_perturbation_fits_on_one_batch_and_applies_to_another(small_model, batch):
    fit_images, fit_labels = gratings(12, seed=11)
    eps = 24 / 255
    attack = make_attack("universal", small_model, eps=eps, attacker="fgsm", max_iter=2)
    perturbation = attack.fit(fit_images, predict(small_model, fit_images))
    assert perturbation.shape == (1, 3, 32, 32) and float(perturbation.abs().max()) <= eps + 1e-6
    images, labels = batch
    result = attack(images, labels)
    assert float(result.norms["linf"].max()) <= eps + 1e-6
    unclipped = ((images + perturbation) >= 0) & ((images + perturbation) <= 1)
    assert torch.allclose((result.adversarial - images)[unclipped], perturbation.expand_as(images)[unclipped], atol=1e-6)
    assert result.success.sum() > 0


# --- fooling images -----------------------------------------------------------------


@pytest.mark.parametrize("name,wanted,generations", [("fooling_direct", [3, 4], 200), ("fooling_cppn", [3, 6], 60)])
def test_fooling_images_reach_the_confidence_they_report(small_model, name, wanted, generations):
    wanted = torch.tensor(wanted)
    model = counted(small_model)
    attack = make_attack(name, model, confidence=0.85, max_generations=generations, population=12, quantize=True)
    result = attack(torch.zeros(2, 3, 32, 32), wanted)
    probabilities = torch.softmax(small_model(result.adversarial), dim=1)
    reached = probabilities[torch.arange(2), wanted]
    assert torch.allclose(result.target_confidence, reached, atol=1e-5)
    assert torch.equal(result.info["reached"], reached >= 0.85)
    assert result.info["reached"].sum() > 0 and torch.all(result.success[result.info["reached"]])
    assert result.norms == {} and is_on_grid(result.adversarial).all()
    assert float(result.queries.sum()) == model.queries


# --- reproducibility, devices, quantization ---------------------------------------------


@pytest.mark.parametrize(
    "name,params",
    [
        ("pgd_linf", {}),
        ("square", {"n_queries": 30}),
        ("one_pixel", {"popsize": 20, "max_iter": 3}),
        ("boundary", {"max_iter": 5}),
        ("hopskipjump", {"max_iter": 1, "max_eval": 20, "init_eval": 10}),
        ("fooling_cppn", {"max_generations": 3}),
    ],
)
def test_same_seed_same_images_other_seed_other_images(small_model, batch, name, params):
    images, labels = batch
    images, labels = images[:2], labels[:2]
    run = lambda seed: make_attack(name, small_model, seed=seed, **params)(images, labels).adversarial  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_attacks_leave_the_callers_random_streams_alone(small_model, batch):
    images, labels = batch
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    make_attack("pgd_linf", small_model, steps=1)(images[:1], labels[:1])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    with isolated_rng(5):
        inside = torch.rand(2)
    with isolated_rng(5):
        assert torch.equal(torch.rand(2), inside)


@pytest.mark.parametrize("device", DEVICES)
def test_attacks_run_where_the_images_are(small_model, batch, device):
    images, labels = batch
    model = SmallCNN().to(device).eval()
    model.load_state_dict(small_model.state_dict())
    for name, params in [("fgsm", {}), ("pgd_l2", {"steps": 2}), ("square", {"n_queries": 10}), ("fooling_direct", {"max_generations": 2})]:
        result = make_attack(name, model, **params)(images[:2].to(device), labels[:2].to(device))
        assert result.adversarial.device.type == torch.device(device).type
        assert result.success.device.type == torch.device(device).type


def test_attack_sources_name_no_device():
    """Device-agnostic code: devices come from the images, never from a literal."""
    for path in Path(__file__).parents[1].joinpath("detector", "attacks").glob("*.py"):
        source = path.read_text()
        pinned = r"""(device\s*=\s*|\.to\(\s*|torch\.device\(\s*)["'](cpu|cuda)|\.cuda\("""
        assert not re.search(pinned, source), path.name


def test_quantize_lands_on_the_grid_and_keeps_budgets():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (3, 3, 16, 16), generator=generator).float() / 255
    noise = torch.randn(clean.shape, generator=generator)
    linf = (clean + 0.031 * noise.sign()).clamp(0, 1)
    snapped = quantize(linf, clean, "linf", 0.031)
    assert is_on_grid(snapped).all() and float(perturbation_norms(snapped, clean)["linf"].max()) <= 0.031 + 1e-6
    direction = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    l2 = (clean + 0.5 * direction).clamp(0, 1)
    snapped = quantize(l2, clean, "l2", 0.5)
    norms = perturbation_norms(snapped, clean)["l2"]
    assert is_on_grid(snapped).all() and float(norms.max()) <= 0.5 + 1e-6
    assert float(norms.min()) > 0.35  # budget-keeping rounding, not truncation to nothing
    assert is_on_grid(quantize(torch.rand(2, 3, 4, 4), clean[:2, :, :4, :4])).all()


def test_norms_count_pixels_not_channels():
    clean = torch.zeros(1, 3, 4, 4)
    adversarial = clean.clone()
    adversarial[0, :, 1, 2] = 0.5
    norms = perturbation_norms(adversarial, clean)
    assert norms["l0"].item() == 1 and math.isclose(norms["linf"].item(), 0.5)
    assert math.isclose(norms["l2"].item(), math.sqrt(3 * 0.25), rel_tol=1e-6)


# --- writing sets -------------------------------------------------------------------


def test_save_adversarial_set_writes_pngs_and_manifest(small_model, batch, tmp_path):
    images, labels = batch
    result = make_attack("fgsm", small_model, quantize=True, seed=3)(images[:3], labels[:3])
    names = ["a/b.png", "second", "third image"]
    class_names = [f"class {k}" for k in range(CLASSES)]
    manifest_path = save_adversarial_set(tmp_path, names, images[:3], result, class_names)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["attack"]["name"] == "fgsm" and manifest["attack"]["seed"] == 3
    assert manifest["attack"]["params"]["eps"] == pytest.approx(8 / 255)
    assert manifest["libraries"]["torchattacks"] == "3.3.0"
    entry = manifest["images"][1]
    assert entry["source"] == "second" and entry["label_before"]["name"] == f"class {int(labels[1])}"
    assert entry["success"] == bool(result.success[1]) and set(entry["norms"]) == {"linf", "l2", "l0"}
    for i, item in enumerate(manifest["images"]):
        saved = np.asarray(Image.open(tmp_path / item["file"]))
        expected = (result.adversarial[i].permute(1, 2, 0) * 255).round().byte().numpy()
        assert np.array_equal(saved, expected)
        assert (tmp_path / item["clean_file"]).is_file()


# --- the real model (slow) ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,params,norm",
    [("fgsm", {"eps": 4 / 255}, "linf"), ("pgd_linf", {"eps": 2 / 255, "steps": 3, "alpha": 1 / 255}, "linf"), ("deepfool", {"candidates": 4, "steps": 10}, None)],
)
def test_real_model_attacks_on_bundled_photos(bundled_model, photo_batch, name, params, norm):
    images = photo_batch[:3]
    labels = predict(bundled_model, images)
    result = make_attack(name, bundled_model, quantize=True, **params)(images, labels)
    assert result.success.sum() >= 2
    assert is_on_grid(result.adversarial).all()
    if norm is not None:
        assert float(result.norms[norm].max()) <= params["eps"] + 1e-6
    else:
        assert float(result.norms["linf"][result.success].max()) < 0.1  # DeepFool stays small


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments",
    [
        ["--attack", "fgsm", "--eps", "0.0157"],
        ["--attack", "pgd_linf", "--targeted", "--target-class", "1", "--param", "steps=2", "--eps", "0.0157"],
        ["--attack", "universal", "--param", "attacker=fgsm", "--param", "max_iter=1"],
        ["--attack", "fooling_cppn", "--target-class", "3", "--param", "max_generations=1", "--param", "population=2"],
    ],
)
def test_cli_writes_an_adversarial_set(tmp_path, arguments):
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "set"
    outcome = CliRunner().invoke(app, ["attack", *arguments, "--bundled", "--count", "2", "--out", str(out)])
    assert outcome.exit_code == 0, outcome.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 2 and manifest["attack"]["quantize"] is True
    assert manifest["attack"]["name"] == arguments[1]
    assert all((out / item["file"]).is_file() for item in manifest["images"])
    for item in manifest["images"]:
        assert np.asarray(Image.open(out / item["file"])).shape == (224, 224, 3)


def test_cli_rejects_bad_usage(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["attack", "--attack", "nope", "--bundled", "--out", str(tmp_path)]).exit_code == 2
    assert runner.invoke(app, ["attack", "--attack", "fgsm", "--targeted", "--bundled", "--out", str(tmp_path)]).exit_code == 2
    assert runner.invoke(app, ["attack", "--attack", "fgsm", "--out", str(tmp_path)]).exit_code == 2
    missing = runner.invoke(app, ["attack", "--attack", "fgsm", "--images", str(tmp_path / "none.png"), "--out", str(tmp_path)])
    assert missing.exit_code == 3
    listing = runner.invoke(app, ["attack", "--list"])
    assert listing.exit_code == 0 and all(name in listing.output for name in ATTACKS)
