"""Detector: scores, verdicts, combiners and the calibration artifact's safety checks."""

from __future__ import annotations

import math

import json

import numpy as np
import pytest
import torch

from detector import (
    CalibrationArtifact,
    CalibrationError,
    Detector,
    LogisticCombiner,
    ModelIdentity,
    ScoreConfig,
    average_local_spatial_entropy,
)
from detector.models import bundled_identity
from detector.signals import LearnedSignal

MODEL = ModelIdentity("toy", "ab" * 32)


def _artifact(tmp_path, threshold=2.0, features=None, model=MODEL, name="cal.json"):
    artifact = CalibrationArtifact.create(threshold, features or {"feature_response": ScoreConfig()}, model)
    path = tmp_path / name
    artifact.save(path)
    return path


def test_score_maps_is_the_entropy_and_verdict_uses_the_threshold(tmp_path):
    detector = Detector(ScoreConfig(levels=16), model_identity=MODEL)
    maps = {"feature_response": torch.rand(3, 3, 20, 20)}
    maps["feature_response"][1] = 1.0  # constant map: entropy 0
    scores = detector.score_maps(maps)
    torch.testing.assert_close(scores, average_local_spatial_entropy(maps["feature_response"], ScoreConfig(levels=16)))
    with pytest.raises(CalibrationError, match="no threshold"):
        detector.verdict(scores)
    assert detector.verdict(scores, threshold=1.0).tolist() == [True, False, True]


def test_artifact_round_trip_sets_threshold_and_id(tmp_path):
    path = _artifact(tmp_path, threshold=2.5)
    detector = Detector(ScoreConfig(), model_identity=MODEL)
    artifact = detector.load_calibration(path)
    assert detector.threshold == 2.5
    assert detector.calibration_id == artifact.id and artifact.id.startswith("cal-")
    document = json.loads(path.read_text())
    for key in ("schema", "threshold", "features", "model", "created_at", "versions", "checksum"):
        assert key in document
    assert document["model"] == {"name": "toy", "weights_sha256": "ab" * 32}
    assert document["versions"]["torch"].startswith("2.13.0")


def test_tampered_artifact_is_refused(tmp_path):
    path = _artifact(tmp_path)
    document = json.loads(path.read_text())
    document["threshold"] = 0.1
    path.write_text(json.dumps(document))
    with pytest.raises(CalibrationError, match="checksum mismatch"):
        Detector(ScoreConfig(), model_identity=MODEL).load_calibration(path)


def test_artifact_for_another_score_config_is_refused_naming_the_fields(tmp_path):
    path = _artifact(tmp_path, features={"feature_response": ScoreConfig(levels=16, patch=5)})
    with pytest.raises(CalibrationError) as error:
        Detector(ScoreConfig(), model_identity=MODEL).load_calibration(path)
    assert "levels: 16 != 256" in str(error.value)
    assert "patch: 5 != 3" in str(error.value)


def test_artifact_for_another_model_is_refused(tmp_path):
    path = _artifact(tmp_path, model=ModelIdentity("toy", "cd" * 32))
    with pytest.raises(CalibrationError, match="model weights: artifact sha256 cdcdcd"):
        Detector(ScoreConfig(), model_identity=MODEL).load_calibration(path)
    path = _artifact(tmp_path, model=bundled_identity(), name="bundled.json")
    with pytest.raises(CalibrationError, match="artifact was fitted on 'efficientnet-lite0', detector runs 'toy'"):
        Detector(ScoreConfig(), model_identity=MODEL).load_calibration(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a readable JSON file"),
        ("[1, 2]", "expected a JSON object"),
        ('{"schema": "other/v9"}', "schema is 'other/v9'"),
    ],
)
def test_malformed_artifacts_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        Detector(ScoreConfig(), model_identity=MODEL).load_calibration(path)
    with pytest.raises(CalibrationError, match="no such file"):
        Detector(ScoreConfig(), model_identity=MODEL).load_calibration(tmp_path / "missing.json")


def test_map_order_survives_the_artifact_even_when_names_sort_differently(tmp_path):
    """Weights follow the fit order; JSON objects do not keep order, the artifact must."""
    features = {"zeta": ScoreConfig(levels=8), "alpha": ScoreConfig(levels=64, gray="abs_sum")}
    combiner = LogisticCombiner(weights=(3.0, -1.0), bias=0.0, mean=(0.0, 0.0), scale=(1.0, 1.0))
    original = Detector(features, combiner=combiner, model_identity=MODEL)
    CalibrationArtifact.create(0.0, features, MODEL, combiner=combiner).save(tmp_path / "ordered.json")
    loaded = Detector.from_artifact(tmp_path / "ordered.json", model_identity=MODEL)
    assert loaded.feature_outputs == ("zeta", "alpha")
    maps = {"zeta": torch.rand(2, 3, 10, 10), "alpha": torch.rand(2, 3, 10, 10)}
    torch.testing.assert_close(loaded.score_maps(maps), original.score_maps(maps))


def test_logistic_combiner_over_several_maps(tmp_path):
    features = {"early": ScoreConfig(response="activation", layer="a", gray="mean"), "late": ScoreConfig(levels=8)}
    combiner = LogisticCombiner(weights=(2.0, -1.0), bias=0.5, mean=(1.0, 2.0), scale=(0.5, 1.0))
    detector = Detector(features, combiner=combiner, model_identity=MODEL)
    maps = {"early": torch.rand(2, 4, 12, 12), "late": torch.rand(2, 3, 12, 12)}
    entropies = detector.entropies(maps)
    expected = 2.0 * (entropies[:, 0] - 1.0) / 0.5 - 1.0 * (entropies[:, 1] - 2.0) + 0.5
    torch.testing.assert_close(detector.score_maps(maps), expected)
    artifact = CalibrationArtifact.create(0.0, features, MODEL, combiner=combiner)
    artifact.save(tmp_path / "combined.json")
    loaded = Detector.from_artifact(tmp_path / "combined.json", model_identity=MODEL)
    assert loaded.combiner == combiner and loaded.feature_outputs == ("early", "late")
    with pytest.raises(KeyError, match="missing feature map"):
        loaded.score_maps({"early": maps["early"]})
    with pytest.raises(ValueError, match="need a fitted combiner"):
        Detector(features, model_identity=MODEL)
    CalibrationArtifact.create(0.0, features, MODEL).save(tmp_path / "single.json")  # SingleMap over two maps
    with pytest.raises(CalibrationError, match="combiner 'single' takes 1 map"):
        Detector.from_artifact(tmp_path / "single.json")


def test_detector_on_a_local_model_scores_activation_and_guided_maps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
    )
    features = {"act": ScoreConfig(response="activation", layer="1", gray="mean"), "gb": ScoreConfig(levels=32)}
    combiner = LogisticCombiner(weights=(1.0, 1.0), bias=0.0, mean=(0.0, 0.0), scale=(1.0, 1.0))
    detector = Detector(features, combiner=combiner, model=model, model_identity=MODEL)
    pixels = torch.rand(2, 3, 16, 16)
    outputs = detector.feature_model()(pixels)
    assert outputs["logits"].shape == (2, 3)
    assert outputs["act"].shape == (2, 4, 14, 14) and outputs["gb"].shape == (2, 3, 16, 16)
    torch.testing.assert_close(detector.score(pixels), detector.score_maps(outputs))


def test_the_shipped_default_is_a_valid_artifact_for_the_bundled_model():
    from detector import DEFAULT_ARTIFACT_PATH, DEFAULT_COMBINER, DEFAULT_FEATURES

    artifact = CalibrationArtifact.load(DEFAULT_ARTIFACT_PATH)
    assert artifact.model == bundled_identity()
    assert artifact.features == DEFAULT_FEATURES and artifact.combiner == DEFAULT_COMBINER
    detector = Detector.default()
    assert detector.threshold == artifact.threshold and detector.calibration_id == artifact.id
    assert detector.feature_outputs == tuple(DEFAULT_FEATURES)


@pytest.mark.slow
def test_default_detector_on_the_bundled_model(photo_batch, tmp_path):
    detector = Detector.default(load_model=True)
    scores = detector.score(photo_batch)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    entropies = detector.entropies(detector.feature_model()(photo_batch))
    from detector.signals import LogitMargin, ResidualEntropy, SoftmaxEntropy, SqueezeDistance

    for column, config in enumerate(detector.features.values()):  # each signal within its possible range
        values = entropies[:, column]
        if isinstance(config, (ScoreConfig, ResidualEntropy)):
            assert ((values > 0) & (values < math.log2(config.patch**2))).all()  # 0 < entropy < log2 k² bits
        elif isinstance(config, SqueezeDistance):
            assert ((values >= 0) & (values <= 2)).all()  # L1 between two distributions
        elif isinstance(config, SoftmaxEntropy):
            assert ((values >= 0) & (values <= math.log2(1000))).all()
        elif isinstance(config, LogitMargin):
            assert (values >= 0).all()
    torch.testing.assert_close(detector.combiner.combine(entropies), scores)
    # The sidecar's path when Triton computed the entropies: NumPy combiner, same scores.
    np.testing.assert_allclose(detector.score_entropies(entropies.numpy()), scores.numpy(), rtol=1e-5, atol=1e-5)
    assert detector.verdict(scores).tolist() == (scores > detector.threshold).tolist()
    threshold = float(scores.median())
    artifact = CalibrationArtifact.create(threshold, detector.features, bundled_identity(), combiner=detector.combiner)
    artifact.save(tmp_path / "median.json")
    detector.load_calibration(tmp_path / "median.json")
    assert detector.verdict(scores).tolist() == (scores > threshold).tolist()


def test_entropy_output_name_pins_the_maps_their_configs_and_order():
    """The name is how the sidecar knows a model's in-Triton entropies fit its calibration."""
    from detector import DEFAULT_FEATURES, entropy_output_name

    configs = list(DEFAULT_FEATURES.values())
    name = entropy_output_name(configs)
    assert name.startswith("advsentry_entropy_") and name == Detector.default().entropy_output
    from detector.signals import feature_from_dict
    from detector.signals.base import pack_array, unpack_array

    assert name == entropy_output_name([feature_from_dict(c.to_dict()) for c in configs])  # stable
    assert entropy_output_name(configs[::-1]) != name  # column order matters
    # any change of a column's configuration, a learned signal's fitted parameters included, renames it
    renamed = set()
    for column, config in enumerate(configs):
        document = config.to_dict()
        key = next(k for k in ("parameters", "reference", "bits", "levels") if k in document) if set(document) - {"signal"} else None
        if key is None:  # parameter-free (logit statistics): nothing to change
            continue
        if isinstance(document[key], int):
            document[key] += 1
        else:  # a packed array: move one value
            values = unpack_array(document[key]).copy()
            values.flat[-1] += 1.0
            document[key] = pack_array(values, dtype=document[key].split(":", 1)[0])
        changed = feature_from_dict(document)
        assert changed != config
        assert entropy_output_name([*configs[:column], changed, *configs[column + 1:]]) != name, config.to_dict().get("signal")
        renamed.add(document.get("signal", "entropy"))
    assert renamed >= {"head", "lid", "squeeze_l1"} or renamed >= {"entropy"}, renamed
    assert entropy_output_name(configs[:-1]) != name


def test_numpy_combiners_equal_the_torch_ones():
    from detector.combiner import LogisticCombiner, SingleMap

    entropies = torch.rand(7, 3, dtype=torch.float64) * 3
    logistic = LogisticCombiner(weights=(0.5, -1.25, 2.0), bias=-0.3, mean=(1.0, 1.5, 2.0), scale=(0.2, 0.5, 1.5))
    np.testing.assert_allclose(logistic.combine_array(entropies.numpy()), logistic.combine(entropies).numpy(), rtol=1e-12)
    np.testing.assert_allclose(SingleMap().combine_array(entropies[:, :1].numpy()), entropies[:, 0].numpy())
    with pytest.raises(ValueError, match="expects"):
        logistic.combine_array(entropies[:, :2].numpy())
    with pytest.raises(ValueError, match="exactly one"):
        SingleMap().combine_array(entropies.numpy())


def test_shipped_detectors_by_name():
    from detector.detector import NAMED_ARTIFACTS, resolve_artifact

    default = Detector.named("default")
    assert default.features == Detector.default().features and default.threshold == Detector.default().threshold
    previous = Detector.named("entropy-9photo")
    assert len(previous.features) == 5 and all(isinstance(c, ScoreConfig) for c in previous.features.values())
    assert previous.threshold is not None
    fixed = Detector.named("fixed-signals")  # the default before the learned signals: none of its signals is fitted
    assert fixed.threshold is not None and fixed.calibration_id != default.calibration_id
    assert not any(isinstance(c, LearnedSignal) for c in fixed.features.values())
    assert any(isinstance(c, LearnedSignal) for c in default.features.values())
    paper = Detector.named("paper")
    assert list(paper.features.values()) == [ScoreConfig()] and paper.threshold is None
    assert resolve_artifact("entropy-9photo") == NAMED_ARTIFACTS["entropy-9photo"]
    assert str(resolve_artifact("some/cal.json")) == "some/cal.json"
    with pytest.raises(KeyError, match="shipped"):
        Detector.named("nope")


def test_export_model_takes_a_shipped_detectors_name(tmp_path):
    """``export-model --calibration NAME`` serves that detector's signals (the name its calibration looks for)."""
    from typer.testing import CliRunner

    from service.cli import app

    result = CliRunner().invoke(app, ["export-model", "--out", str(tmp_path), "--calibration", "fixed-signals"])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "efficientnet-lite0" / "config.pbtxt").read_text()
    assert Detector.named("fixed-signals").entropy_output in config
    assert Detector.default().entropy_output not in config
