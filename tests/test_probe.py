"""Local-property probes: the Mantel statistic equals a reference, the Lipschitz estimate of a linear map equals
its operator norm on the probed directions, isotropy/symmetry of known maps, AUC with a bootstrap interval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform
from scipy.stats import pearsonr, spearmanr
from torch import nn

from detector.probe import (
    PROBES,
    REPORTED,
    ProbeConfig,
    auc_with_interval,
    isotropy_symmetry,
    lipschitz_from_outputs,
    local_lipschitz,
    mantel_statistic,
    neighbourhood_mantel,
    probe_one,
    random_directions,
)


def _distance_matrix(points: np.ndarray) -> np.ndarray:
    return squareform(pdist(points))


def test_mantel_equals_reference_on_known_matrices():
    # Hand example: x and y = 2x + 1 off the diagonal are perfectly correlated, y reversed is not.
    x = np.array([[0, 1, 2, 3], [1, 0, 4, 5], [2, 4, 0, 6], [3, 5, 6, 0]], dtype=float)
    r, p = mantel_statistic(x, 2 * x + 1 - np.diag([1.0] * 4))
    assert r == pytest.approx(1.0) and p is None
    y = np.array([[0, 6, 5, 4], [6, 0, 3, 2], [5, 3, 0, 1], [4, 2, 1, 0]], dtype=float)
    r, _ = mantel_statistic(x, y)
    assert r == pytest.approx(-1.0)
    # Reference: Pearson / Spearman correlation of the upper triangles (the Mantel statistic's definition).
    rng = np.random.default_rng(0)
    a, b = _distance_matrix(rng.normal(size=(9, 5))), _distance_matrix(rng.normal(size=(9, 3)))
    iu = np.triu_indices(9, 1)
    assert mantel_statistic(a, b)[0] == pytest.approx(pearsonr(a[iu], b[iu])[0], abs=1e-12)
    assert mantel_statistic(a, b, method="spearman")[0] == pytest.approx(spearmanr(a[iu], b[iu])[0], abs=1e-12)
    # With permutations a p-value comes back; a perfectly related pair is significant.
    points = rng.normal(size=(10, 4))
    _, p = mantel_statistic(_distance_matrix(points), _distance_matrix(3 * points), permutations=199, seed=1)
    assert p is not None and p <= 0.01
    with pytest.raises(ValueError):
        mantel_statistic(a[:2, :2], b[:2, :2])


def test_neighbourhood_mantel_of_an_isometry_is_one():
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(8, 20))
    rotation, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    assert neighbourhood_mantel(inputs, inputs @ rotation.T)[0] == pytest.approx(1.0)


def test_lipschitz_of_a_linear_map_equals_its_operator_norm_on_the_probed_directions():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(5, 12)))
    f = lambda batch: batch.flatten(1) @ a.T  # noqa: E731
    x = torch.from_numpy(rng.normal(size=(12,)))
    directions = random_directions((12,), 6, 0.3, torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = max(float((a @ d).norm() / d.norm()) for d in directions)
    assert local_lipschitz(f, x, directions) == pytest.approx(expected, rel=1e-10)
    assert expected < float(torch.linalg.matrix_norm(a, ord=2))  # random directions miss the top singular one
    # With the top right-singular vector among the directions the estimate is the operator norm ‖A‖₂.
    top = torch.linalg.svd(a).Vh[0]
    with_top = torch.cat([directions, 0.3 * top.unsqueeze(0)])
    assert local_lipschitz(f, x, with_top) == pytest.approx(float(torch.linalg.matrix_norm(a, ord=2)), rel=1e-10)
    with pytest.raises(ValueError):
        lipschitz_from_outputs(np.zeros(5), np.zeros((1, 5)), np.zeros((1, 12)))


def test_isotropy_and_symmetry_of_known_maps():
    generator = torch.Generator().manual_seed(0)
    directions = random_directions((50,), 10, 0.5, generator, dtype=torch.float64)
    assert torch.allclose(directions.norm(dim=1), torch.full((10,), 0.5, dtype=torch.float64))
    x = torch.rand(50, generator=generator).double()
    # identity: every equal-norm direction changes the output equally (isotropic) and ± alike (symmetric)
    stats = isotropy_symmetry(x.numpy(), (x + directions).numpy(), (x - directions).numpy())
    assert stats["isotropy_cv"] == pytest.approx(0.0, abs=1e-12) and stats["asymmetry"] == pytest.approx(0.0, abs=1e-12)
    # an anisotropic linear map: symmetric still, no longer isotropic
    scale = torch.linspace(0.1, 3.0, 50, dtype=torch.float64)
    stats = isotropy_symmetry((scale * x).numpy(), (scale * (x + directions)).numpy(), (scale * (x - directions)).numpy())
    assert stats["asymmetry"] == pytest.approx(0.0, abs=1e-12) and stats["isotropy_cv"] > 0.01
    # ReLU at a point on the kink: f(x + d) and f(x - d) differ, asymmetric
    zero = torch.zeros(50, dtype=torch.float64)
    relu = isotropy_symmetry(zero.numpy(), torch.relu(directions).numpy(), torch.relu(-directions).numpy())
    relu_shifted = isotropy_symmetry(torch.relu(zero + 10).numpy(), torch.relu(10 + directions).numpy(),
                                     torch.relu(10 - directions).numpy())
    assert relu_shifted["asymmetry"] == pytest.approx(0.0, abs=1e-9) and relu["asymmetry"] > 0.01


def test_probe_one_on_a_small_cnn_is_finite_and_reproducible():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 6)).eval()
    x = torch.rand(3, 16, 16)
    config = ProbeConfig(radius=0.5, directions=4, neighbours=5, seed=3)
    first, second = probe_one(model, x, config), probe_one(model, x, config)
    assert list(first) == list(REPORTED) and first == second and 0 < first["top1_probability"] <= 1
    assert all(np.isfinite(v) for v in first.values())
    assert -1.0 <= first["mantel_logits"] <= 1.0 and first["lipschitz_logits"] > 0


def test_auc_with_interval():
    separated = auc_with_interval(np.arange(20.0), np.arange(20.0) + 100, resamples=200)
    assert separated["auc"] == 1.0 and separated["low"] == 1.0 and separated["separation"] == 1.0
    reversed_ = auc_with_interval(np.arange(20.0) + 100, np.arange(20.0), resamples=200)
    assert reversed_["auc"] == 0.0 and reversed_["separation"] == 1.0
    rng = np.random.default_rng(0)
    same = auc_with_interval(rng.normal(size=200), rng.normal(size=200), resamples=300)
    assert same["low"] < 0.5 < same["high"]
    assert auc_with_interval([1.0], [2.0, 3.0])["auc"] is None


def test_probe_conclusion_rule():
    from service.commands.probe import conclusion

    def attack(low, high, n=20):
        return {"auc": {"lipschitz_logits": {"auc": (low + high) / 2, "low": low, "high": high, "clean": n,
                                             "adversarial": n}}}

    assert "useful" in conclusion({"fgsm": attack(0.05, 0.2)}) and "lipschitz_logits" in conclusion(
        {"fgsm": attack(0.05, 0.2)})
    assert conclusion({"fgsm": attack(0.45, 0.9)}).startswith("no probe")
    assert "not judged" in conclusion({"fgsm": attack(0.9, 1.0, n=5)})


@pytest.mark.slow
def test_probe_cli_writes_json_and_html(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from detector.samples import full_photo_samples
    from service.cli import app

    images = tmp_path / "images"
    images.mkdir()
    for sample in full_photo_samples()[:2]:
        Image.fromarray(sample.pixels()).save(images / f"{sample.name}.png")
    result = CliRunner().invoke(app, ["probe", "--images", str(images), "--attack", "fgsm", "--directions", "2",
                                      "--neighbours", "3", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert len(report["clean"]) == 2 and set(report["attacks"]) == {"fgsm"}
    assert report["attacks"]["fgsm"]["succeeded"] == len(report["attacks"]["fgsm"]["adversarial"])
    assert set(report["summary"]["clean"]) == set(REPORTED) and set(report["spearman_with_top1_probability"]) == set(PROBES)
    page = (tmp_path / "out" / "index.html").read_text()
    assert "data:image/png;base64," in page and "lipschitz_softmax" in page
