"""Named detection signals: each against a hand computation on small inputs, and their (de)serialization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from detector import CalibrationArtifact, CalibrationError, Detector, LogisticCombiner, ModelIdentity, ScoreConfig, entropy_output_name
from detector.entropy import average_local_spatial_entropy
from detector.features import FeatureModel, extract_maps
from detector.signals import (
    HighFrequencyEnergy,
    LogitMargin,
    ResidualEntropy,
    SignalContext,
    SignalError,
    SoftmaxEntropy,
    SqueezeDistance,
    feature_from_dict,
    signal_from_dict,
)
from detector.signals.squeeze import bit_depth, median_filter
from tiny_models import tiny_cnn

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])


def _context(logits: torch.Tensor = LOGITS, pixels: torch.Tensor | None = None, model=None) -> SignalContext:
    pixels = torch.zeros(len(logits), 3, 4, 4) if pixels is None else pixels
    return SignalContext(model or torch.nn.Identity(), pixels, logits)


def test_logit_margin_and_softmax_entropy_by_hand():
    assert LogitMargin().compute(_context()).flatten().tolist() == pytest.approx([1.5, 3.0])
    p = np.exp([2.0, 0.5, -1.0]) / np.exp([2.0, 0.5, -1.0]).sum()
    expected = -(p * np.log2(p)).sum()
    uniform = SoftmaxEntropy().values(_context(torch.zeros(1, 4)))
    assert SoftmaxEntropy().values(_context())[0].item() == pytest.approx(expected, rel=1e-5)
    assert uniform.item() == pytest.approx(2.0)  # 4 equal classes: 2 bits


def test_bit_depth_rounds_to_the_grid():
    x = torch.tensor([0.0, 0.1, 0.49, 0.5, 1.0])
    assert bit_depth(x, 1).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]  # torch.round: half to even
    assert torch.allclose(bit_depth(x, 5) * 31, torch.round(x * 31))


@pytest.mark.parametrize("size", [2, 3])
def test_median_filter_equals_scipy(size):
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(size))
    expected = ndimage.median_filter(x.numpy(), size=(1, 1, size, size))  # EvadeML-Zoo's squeezer
    assert np.array_equal(median_filter(x, size).numpy(), expected)


def test_squeeze_distance_is_the_l1_between_softmaxes():
    model = tiny_cnn().eval()
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixels)
        for signal in (SqueezeDistance("bit_depth", bits=3), SqueezeDistance("median", size=2)):
            squeezed = model(signal.squeeze(pixels))
            expected = (torch.softmax(logits, 1) - torch.softmax(squeezed, 1)).abs().sum(1)
            assert torch.allclose(signal.values(_context(logits, pixels, model)), expected, atol=1e-6)
    # an input already on the 3-bit grid is its own squeezed copy
    on_grid = bit_depth(pixels, 3)
    with torch.no_grad():
        value = SqueezeDistance("bit_depth", bits=3).values(_context(model(on_grid), on_grid, model))
    assert torch.allclose(value, torch.zeros(3), atol=1e-7)


def test_high_frequency_share_of_pure_tones():
    y, x = np.mgrid[0:32, 0:32]
    low = np.cos(2 * np.pi * 2 * x / 32)  # 2 cycles: radial frequency 2/32 / 0.5 = 0.125 of Nyquist
    high = np.cos(2 * np.pi * 12 * x / 32)  # 0.75 of Nyquist
    gray = torch.tensor(np.stack([low, high]), dtype=torch.float32)[:, None]
    pixels = gray.repeat(1, 3, 1, 1) * 0.25 + 0.5
    shares = HighFrequencyEnergy(cutoff=0.5).values(_context(torch.zeros(2, 3), pixels)).exp()
    assert shares[0].item() < 1e-6 and shares[1].item() == pytest.approx(1.0, abs=1e-5)
    # halfway: cutoff between the two tones of a mixture splits the power by their squared amplitudes
    mixture = pixels[:1] * 0 + torch.tensor(0.5 + 0.2 * low + 0.1 * high, dtype=torch.float32)
    share = HighFrequencyEnergy(cutoff=0.5).values(_context(torch.zeros(1, 3), mixture)).exp()
    assert share.item() == pytest.approx(0.01 / (0.04 + 0.01), rel=1e-4)


def test_residual_entropy_equals_the_entropy_of_a_hand_made_residual():
    pixels = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    signal = ResidualEntropy(levels=8, patch=3)
    padded = np.pad(pixels.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    blurred = np.stack([[ndimage.uniform_filter(c, 3)[1:-1, 1:-1] for c in image] for image in padded])
    residual = torch.tensor(pixels.numpy() - blurred)
    expected = average_local_spatial_entropy(residual, ScoreConfig(gray="luminance", normalize="standardize", levels=8))
    assert torch.allclose(signal.values(_context(torch.zeros(2, 3), pixels)), expected, atol=1e-5)


def test_signals_serialize_and_refuse_bad_configs():
    for signal in (LogitMargin(), SoftmaxEntropy(), SqueezeDistance("median", size=3), HighFrequencyEnergy("net.x", 0.7),
                   ResidualEntropy(levels=4)):
        document = signal.to_dict()
        assert document["signal"] == signal.kind
        assert feature_from_dict(document) == signal == signal_from_dict(document)
    assert feature_from_dict(ScoreConfig().to_dict()) == ScoreConfig()
    with pytest.raises(SignalError, match="unknown signal"):
        signal_from_dict({"signal": "nope"})
    with pytest.raises(SignalError, match="unknown field"):
        signal_from_dict({"signal": "logit_margin", "bits": 3})
    with pytest.raises(SignalError, match="bits"):
        SqueezeDistance("bit_depth", bits=12)
    with pytest.raises(SignalError, match="cutoff"):
        HighFrequencyEnergy(cutoff=2.0)


FEATURES = {
    "act": ScoreConfig(response="activation", layer="features.1", gray="mean", levels=16),
    "margin": LogitMargin(),
    "bits": SqueezeDistance("bit_depth", bits=4),
    "spectral": HighFrequencyEnergy(layer="features.0"),
}


def test_feature_model_serves_maps_and_signals_and_detector_combines_them():
    model = tiny_cnn().eval()
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    outputs = FeatureModel(model, FEATURES)(pixels)
    assert outputs["act"].shape == (3, 8, 16, 16)
    assert all(outputs[name].shape == (3, 1) for name in ("margin", "bits", "spectral"))
    combiner = LogisticCombiner(weights=(1.0, -0.5, 2.0, 0.1), bias=0.2, mean=(0,) * 4, scale=(1,) * 4, quadratic=(0.0, 0.1, 0.0, 0.0))
    detector = Detector(FEATURES, combiner=combiner, model=model)
    values = detector.entropies({k: v for k, v in outputs.items() if k != "logits"}).numpy()
    with torch.no_grad():
        margin = LogitMargin().values(_context(model(pixels), pixels, model))
    assert np.allclose(values[:, 1], margin.numpy(), atol=1e-6)
    z = values.astype(np.float64)
    expected = z @ np.array([1.0, -0.5, 2.0, 0.1]) + 0.1 * z[:, 1] ** 2 + 0.2
    assert np.allclose(detector.score(pixels).numpy(), expected, atol=1e-4)
    assert np.allclose(combiner.contributions(z).sum(1) + 0.2, expected)


def test_artifact_with_signals_round_trips_and_refuses_a_changed_signal(tmp_path):
    identity = ModelIdentity("tiny", "0" * 64)
    combiner = LogisticCombiner(weights=(1.0,) * 4, bias=0.0, mean=(0,) * 4, scale=(1,) * 4, quadratic=(0.5,) * 4)
    path = tmp_path / "cal.json"
    CalibrationArtifact.create(1.0, FEATURES, identity, combiner).save(path)
    loaded = CalibrationArtifact.load(path)
    assert loaded.features == FEATURES and loaded.combiner == combiner
    changed = dict(FEATURES, bits=SqueezeDistance("bit_depth", bits=5))
    with pytest.raises(CalibrationError, match="bits: 4 != 5"):
        Detector(changed, combiner=combiner, model_identity=identity).load_calibration(path)
    swapped = dict(FEATURES, margin=SoftmaxEntropy())
    with pytest.raises(CalibrationError, match="logit_margin"):
        Detector(swapped, combiner=combiner, model_identity=identity).load_calibration(path)
    assert entropy_output_name(changed.values()) != entropy_output_name(FEATURES.values())


def test_extract_maps_runs_each_squeezer_once_per_batch():
    model = tiny_cnn().eval()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    features = {"a": SqueezeDistance("bit_depth", bits=4), "b": SqueezeDistance("bit_depth", bits=4), "m": LogitMargin()}
    extract_maps(model, torch.rand(2, 3, 8, 8), features)
    assert len(calls) == 2  # the model's own forward + one squeezed copy shared by "a" and "b"
