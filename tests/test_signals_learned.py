"""Learned signals (LID, Fourier read-out, small head): hand computations, fitting, artifact round-trip, Triton = local."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import CalibrationArtifact, CalibrationError, Detector, LogisticCombiner, ModelIdentity, entropy_output_name
from detector.evaluation import auc
from detector.features import FeatureModel, extract_maps
from detector.signals import (
    FourierFeatures,
    LearnedHead,
    LocalIntrinsicDimensionality,
    SignalContext,
    SignalError,
    feature_from_dict,
)
from detector.signals.base import pack_array, unpack_array
from detector.signals.fourier import spectrum_features
from detector.signals.head import HeadParameters, head_forward
from detector.signals.lid import lid_mle, pooled_activations
from tiny_models import tiny_cnn

TESTS_DIR = Path(__file__).resolve().parent


def _raw_context(model, pixels, layers):
    from detector.features import _capture_activations

    captured, handles = _capture_activations(model, set(layers))
    try:
        with torch.no_grad():
            logits = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return SignalContext(model, pixels, logits, activations=captured)


# ---- LID ------------------------------------------------------------------------------------------------------

def test_lid_mle_equals_the_formula_by_hand():
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -4.0], [10.0, 10.0]])
    query = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    k = 3
    expected = []
    for q in query.numpy():
        r = np.sort(np.linalg.norm(reference.numpy() - q, axis=1))[:k]
        expected.append(-1.0 / np.mean(np.log(r / r[-1])))
    assert np.allclose(lid_mle(query, reference, k).numpy(), expected, rtol=1e-5)
    # query (0,0): distances 1, 2, 3 → LID = -1 / mean(log(1/3), log(2/3), 0)
    assert math.isclose(float(lid_mle(query[:1], reference, k)), -1.0 / ((math.log(1 / 3) + math.log(2 / 3)) / 3), rel_tol=1e-5)
    # all neighbours at the same distance: a large finite value, not inf or nan
    ring = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert torch.isfinite(lid_mle(torch.zeros(1, 2), ring, 3)).all()


def test_lid_signal_pools_the_layer_and_uses_its_stored_reference():
    model = tiny_cnn().eval()
    pixels = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    context = _raw_context(model, pixels, ["features.3"])
    pooled = context.activations["features.3"].mean(dim=(2, 3))
    assert torch.allclose(pooled_activations(context.activations["features.3"]), pooled)
    reference = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float16)
    signal = LocalIntrinsicDimensionality(layer="features.3", k=4, reference=pack_array(reference, "float16"))
    expected = []
    for q in pooled.numpy():
        r = np.sort(np.linalg.norm(reference.astype(np.float32) - q, axis=1))[:4]
        expected.append(-1.0 / np.mean(np.log(r / r[-1])))
    assert np.allclose(signal.values(context).numpy(), expected, rtol=1e-4)
    # fit: a random subset of the clean rows, at most `size`, stored as float16
    fitted = LocalIntrinsicDimensionality(layer="features.3", k=2).fit(np.arange(40, dtype=np.float32).reshape(10, 4), size=5)
    stored = fitted.reference_array
    assert stored.shape == (5, 4) and set(stored[:, 0] // 4) <= set(range(10)) and len(set(stored[:, 0])) == 5


# ---- Fourier --------------------------------------------------------------------------------------------------

def _spectrum_by_hand(image: np.ndarray, radial: int, angular: int) -> np.ndarray:
    height, width = image.shape
    log_power = np.log(np.abs(np.fft.fft2(image - image.mean())) ** 2 + 1e-10)
    fy, fx = np.fft.fftfreq(height), np.fft.fftfreq(width)
    edges = np.linspace(0.0, math.sqrt(2.0) + 1e-6, radial + 1)
    rings, sectors = [[] for _ in range(radial)], [[] for _ in range(angular)]
    everything = []
    for i in range(height):
        for j in range(width):
            radius = math.hypot(fy[i], fx[j]) / 0.5
            if radius == 0:
                continue
            everything.append(log_power[i, j])
            for b in range(radial):
                if edges[b] < radius <= edges[b + 1]:
                    rings[b].append(log_power[i, j])
            if radius > 0.5:
                angle = math.atan2(fy[i], fx[j]) % math.pi
                sectors[min(int(angle / (math.pi / angular)), angular - 1)].append(log_power[i, j])
    means = [np.mean(v) if v else 0.0 for v in rings + sectors]
    return np.array(means) - np.mean(everything)


def test_fourier_features_equal_the_binned_log_spectrum_by_hand():
    rng = np.random.default_rng(2)
    image = rng.random((8, 8)).astype(np.float32)
    got = spectrum_features(torch.from_numpy(image)[None, None], radial_bins=4, angular_bins=3)[0].numpy()
    assert np.allclose(got, _spectrum_by_hand(image.astype(np.float64), 4, 3), atol=1e-4)
    # A layer's channels: their powers are averaged before the log
    maps = rng.random((1, 2, 6, 6)).astype(np.float32)
    power = np.mean([np.abs(np.fft.fft2(m - m.mean())) ** 2 for m in maps[0]], axis=0)
    one = spectrum_features(torch.from_numpy(maps), 3, 2)[0].numpy()
    # the same as a single map whose power spectrum is that mean: check the first ring directly
    fy, fx = np.meshgrid(np.fft.fftfreq(6), np.fft.fftfreq(6), indexing="ij")
    radius = np.hypot(fy, fx) / 0.5
    ring = (radius > 0) & (radius <= math.sqrt(2) / 3 + 1e-6 / 3)
    assert math.isclose(one[0], np.log(power + 1e-10)[ring].mean() - np.log(power + 1e-10)[radius > 0].mean(), rel_tol=1e-4)


def test_fourier_signal_is_a_linear_read_out_of_the_luminance_spectrum():
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    luminance = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    signal = FourierFeatures(radial_bins=3, angular_bins=2, mean=(0.1, 0.2, 0.3, 0.4, 0.5), scale=(1.0, 2.0, 1.0, 0.5, 1.0),
                             weights=(1.0, -1.0, 0.5, 0.0, 2.0), bias=-0.25)
    values = signal.values(SignalContext(torch.nn.Identity(), pixels, torch.zeros(3, 2)))
    expected = [((_spectrum_by_hand(l.numpy().astype(np.float64), 3, 2) - np.array(signal.mean)) / np.array(signal.scale))
                @ np.array(signal.weights) - 0.25 for l in luminance]
    assert np.allclose(values.numpy(), expected, atol=1e-4)


def test_fourier_fit_separates_added_high_frequency_noise():
    generator = torch.Generator().manual_seed(5)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(60, 1, 20, 20, generator=generator), 5, 1, 2)
    noisy = smooth + 0.05 * torch.randn(smooth.shape, generator=generator)
    features = lambda x: spectrum_features(x, 6, 2).numpy()  # noqa: E731
    signal = FourierFeatures(radial_bins=6, angular_bins=2).fit(features(smooth[:40]), features(noisy[:40]))
    held_out = auc(signal.from_raw(torch.from_numpy(features(smooth[40:]))).numpy(),
                   signal.from_raw(torch.from_numpy(features(noisy[40:]))).numpy())
    assert held_out > 0.95


# ---- learned head ----------------------------------------------------------------------------------------------

def test_head_forward_equals_loops_by_hand():
    rng = np.random.default_rng(6)
    channels, hidden = 3, 2
    flat = rng.normal(size=HeadParameters.size(channels, hidden)).astype(np.float32)
    flat[channels : 2 * channels] = np.abs(flat[channels : 2 * channels]) + 0.5  # scales > 0
    maps = rng.normal(size=(2, channels, 3, 4)).astype(np.float32)
    mean, scale = flat[:channels], flat[channels : 2 * channels]
    conv_w = flat[2 * channels : 2 * channels + hidden * channels].reshape(hidden, channels)
    rest = flat[2 * channels + hidden * channels :]
    conv_b, lin_w, lin_b = rest[:hidden], rest[hidden : 3 * hidden], rest[3 * hidden]
    expected = []
    for image in maps:
        z = (image - mean[:, None, None]) / scale[:, None, None]
        units = np.zeros((hidden, 3, 4))
        for unit in range(hidden):
            for y in range(3):
                for x in range(4):
                    units[unit, y, x] = max(0.0, sum(conv_w[unit, c] * z[c, y, x] for c in range(channels)) + conv_b[unit])
        pooled = np.r_[units.mean(axis=(1, 2)), units.max(axis=(1, 2))]
        expected.append(pooled @ lin_w + lin_b)
    signal = LearnedHead(layer="x", channels=channels, hidden=hidden, parameters=pack_array(flat))
    assert np.allclose(signal.from_raw(torch.from_numpy(maps)).numpy(), expected, atol=1e-5)
    assert np.allclose(head_forward(torch.from_numpy(maps), signal.head_parameters()).numpy(), expected, atol=1e-5)


def test_head_fit_learns_a_local_perturbation():
    generator = torch.Generator().manual_seed(7)
    clean = torch.rand(80, 4, 6, 6, generator=generator)
    adversarial = torch.rand(80, 4, 6, 6, generator=generator)
    adversarial[:, 2, 1, 1] += 1.5  # one strong local response in channel 2
    fit = dict(seed=0, steps=80, batch=64, lr=0.03)
    signal = LearnedHead(layer="x", hidden=4).fit(clean[:60].numpy(), adversarial[:60].numpy(), **fit)
    assert signal.channels == 4 and signal.fitted
    assert auc(signal.from_raw(clean[60:]).detach().numpy(), signal.from_raw(adversarial[60:]).detach().numpy()) > 0.95
    again = LearnedHead(layer="x", hidden=4).fit(clean[:60].numpy(), adversarial[:60].numpy(), **fit)
    assert again == signal  # deterministic per seed: the study's caches and the artifact are reproducible


# ---- serialization, artifact, export ---------------------------------------------------------------------------

def _fitted_features(model) -> dict:
    """The three learned signals fitted on random inputs of the tiny CNN (its layers features.1 / features.3)."""
    generator = torch.Generator().manual_seed(8)
    clean, noisy = torch.rand(24, 3, 16, 16, generator=generator), torch.rand(24, 3, 16, 16, generator=generator)
    noisy = (noisy * 0.2 + clean * 0.8).clamp(0, 1)
    templates = {"lid": LocalIntrinsicDimensionality(layer="features.3", k=5),
                 "fourier": FourierFeatures(radial_bins=5, angular_bins=2),
                 "head": LearnedHead(layer="features.1", hidden=3)}
    layers = {layer for t in templates.values() for layer in t.layers()}
    c_ctx, a_ctx = _raw_context(model, clean, layers), _raw_context(model, noisy, layers)
    fitted = {}
    for name, template in templates.items():
        kwargs = {"steps": 10, "batch": 32} if name == "head" else {}
        fitted[name] = template.fit(template.raw(c_ctx).numpy(), template.raw(a_ctx).numpy(), **kwargs)
    return fitted


def test_learned_signals_serialize_and_refuse_bad_or_unfitted_configs():
    model = tiny_cnn().eval()
    features = _fitted_features(model)
    for signal in features.values():
        assert feature_from_dict(signal.to_dict()) == signal
    with pytest.raises(SignalError, match="not fitted"):
        LearnedHead(layer="features.1").values(_raw_context(model, torch.rand(1, 3, 8, 8), {"features.1"}))
    with pytest.raises(SignalError, match="malformed"):
        LocalIntrinsicDimensionality(layer="features.3", reference="float16:2x2:not base64!")
    with pytest.raises(SignalError, match="expected"):  # a reference smaller than k
        LocalIntrinsicDimensionality(layer="features.3", k=5, reference=pack_array(np.zeros((3, 8)), "float16"))
    with pytest.raises(SignalError, match="need 7 values"):
        FourierFeatures(radial_bins=5, angular_bins=2, weights=(1.0,), mean=(0.0,), scale=(1.0,))
    with pytest.raises(SignalError, match="expected 39 values"):
        LearnedHead(layer="features.1", channels=8, hidden=2, parameters=pack_array(np.zeros(5)))
    assert np.array_equal(unpack_array(pack_array(np.arange(6.0).reshape(2, 3))), np.arange(6.0).reshape(2, 3))


def test_artifact_with_learned_signals_round_trips_and_refuses_a_refitted_one(tmp_path):
    model = tiny_cnn().eval()
    features = _fitted_features(model)
    identity = ModelIdentity("tiny", "0" * 64)
    combiner = LogisticCombiner(weights=(0.5, -1.0, 2.0), bias=0.1, mean=(0.0,) * 3, scale=(1.0,) * 3)
    path = tmp_path / "cal.json"
    CalibrationArtifact.create(0.3, features, identity, combiner).save(path)
    loaded = CalibrationArtifact.load(path)
    assert loaded.features == features and list(loaded.features) == list(features)
    pixels = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    original = Detector(features, combiner=combiner, model=model).score(pixels)
    reloaded = Detector.from_artifact(path, model=model).score(pixels)
    assert torch.equal(original, reloaded)
    # a signal refitted (another reference set) must not be combined with this calibration
    refit = dict(features, lid=features["lid"].fit(np.random.default_rng(1).normal(size=(30, 8)), seed=1))
    with pytest.raises(CalibrationError, match="reference: 'float16:"):
        Detector(refit, combiner=combiner, model_identity=identity).load_calibration(path)
    assert entropy_output_name(refit.values()) != entropy_output_name(features.values())


def test_feature_model_serves_learned_signals_equal_to_their_parts():
    model = tiny_cnn().eval()
    features = _fitted_features(model)
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    outputs = FeatureModel(model, features)(pixels)
    context = _raw_context(model, pixels, {"features.1", "features.3"})
    for name, signal in features.items():
        assert outputs[name].shape == (3, 1)
        assert torch.allclose(outputs[name][:, 0], signal.from_raw(signal.raw(context)), atol=1e-6)
    maps, _ = extract_maps(model, pixels, features)
    assert torch.allclose(Detector(features, combiner=LogisticCombiner((1.0,) * 3, 0.0, (0.0,) * 3, (1.0,) * 3)).entropies(maps),
                          torch.cat([outputs[n] for n in features], dim=1))


@pytest.mark.slow
def test_triton_serves_the_learned_signals_the_local_detector_computes(tmp_path):
    """Exported with the learned signals, a real Triton's ``[B, F]`` output equals the local computation."""
    import tritonclient.grpc as grpcclient

    from e2e_triton import infer_input, outputs
    from service.triton.export import ModelSource, export_model_repository
    from service.triton.server import TritonServer

    model = tiny_cnn().eval()
    features = _fitted_features(model)
    export_model_repository(tmp_path / "repo", model_name="tiny", source=ModelSource("factory", "tiny_models:tiny_cnn"),
                            features=features, image_size=16, max_batch_size=4)
    detector = Detector(features, combiner=LogisticCombiner((1.0,) * 3, 0.0, (0.0,) * 3, (1.0,) * 3), model=model)
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        local = detector.entropies(detector.maps_and_logits(pixels)[0]).numpy()
    server = TritonServer(tmp_path / "repo", env={"ADVSENTRY_PYTHONPATH": str(TESTS_DIR)})
    server.start()
    try:
        client = grpcclient.InferenceServerClient(server.grpc_address)
        answer = client.infer("tiny", [infer_input(pixels.numpy())], outputs=outputs(detector.entropy_output))
        served = answer.as_numpy(detector.entropy_output)
    finally:
        server.stop()
    assert served.shape == (4, 3)
    assert np.allclose(served, local, rtol=1e-5, atol=1e-5)
