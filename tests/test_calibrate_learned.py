"""``advsentry calibrate run --refit-signals``: learned signals refitted on the fit split, out of fold by source.

The model is ``calibrate_models.target_cnn`` (32x32 crops of the bundled
photos) and the ``--detector`` a tiny artifact written here: one LID, one
head, one Fourier read-out and the logit margin, fitted on a few images, so
a whole job (clean chunks, one fgsm, the cross-fit) runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from detector import CalibrationArtifact, Detector
from detector.calibrate import AttackSpec, CalibrationJob, JobConfig, JobConfigError, run_calibration
from detector.calibrate.access import load_model
from detector.calibrate.data import plan_clean_images
from detector.combiner import fit_logistic_combiner
from detector.detector import map_entropies
from detector.features import extract_maps
from detector.signals import FourierFeatures, LearnedHead, LocalIntrinsicDimensionality, LogitMargin
from detector.signals.fitting import cross_fit, fit_signal, raw_bank, signal_values

MODEL = "calibrate_models:target_cnn"
ATTACK = "fgsm:eps=0.0314"
LEARNED = ("lid", "head", "fourier")


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory) -> Path:
    """An artifact for ``target_cnn`` with learned signals fitted on random images (what --detector names)."""
    model, identity = load_model(MODEL)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(12, 3, 32, 32, generator=generator)
    noisy = (clean + 0.1 * torch.randn(12, 3, 32, 32, generator=generator)).clamp(0, 1)
    templates = {
        "lid": LocalIntrinsicDimensionality(layer="features.3", k=3),
        "head": LearnedHead(layer="pool", hidden=4),  # 4x4 maps: its fits stay cheap
        "fourier": FourierFeatures(layer=None, radial_bins=4, angular_bins=2),
    }
    raw_clean, raw_noisy = raw_bank(model, clean, templates, 6), raw_bank(model, noisy, templates, 6)
    features = {name: t.fit(raw_clean[name].float().numpy(), raw_noisy[name].float().numpy(), seed=0)
                for name, t in templates.items()}
    features["margin"] = LogitMargin()
    rows_clean, rows_noisy = (map_entropies(extract_maps(model, x, features)[0], features).double().numpy() for x in (clean, noisy))
    combiner = fit_logistic_combiner(rows_clean, rows_noisy)
    path = tmp_path_factory.mktemp("detector") / "tiny.json"
    CalibrationArtifact.create(0.0, features, identity, combiner).save(path)
    return path


def config(detector: Path | str, **overrides) -> JobConfig:
    values = dict(model=MODEL, detector=str(detector), image_size=32, crops_per_photo=4, min_confidence=0.0, n_boot=20,
                  chunk_size=8, attacks=(AttackSpec.parse(ATTACK),), target_fprs=(0.1,), refit_signals=True)
    values.update(overrides)
    return JobConfig(**values)


@pytest.fixture(scope="module")
def refitted(tiny_detector, tmp_path_factory):
    root = tmp_path_factory.mktemp("refit")
    artifact = run_calibration(config(tiny_detector), root / "work", out=root / "cal.json", progress=False)
    return root, artifact


def test_refitted_artifact_carries_new_signal_parameters_and_scores(tiny_detector, refitted):
    root, artifact = refitted
    before = CalibrationArtifact.load(tiny_detector)
    loaded = CalibrationArtifact.load(root / "cal.json")  # schema and checksum
    for name in LEARNED:
        assert loaded.features[name].differences(before.features[name]), f"{name} was not refitted"
        assert loaded.features[name].fitted
    assert loaded.features["margin"] == before.features["margin"]
    assert loaded.results["signals"] == "refitted on the fit split, out-of-fold by source"
    fits = loaded.results["signal_fits"]
    assert set(fits) == set(LEARNED)
    fit_sources = loaded.data["sample_size"]["sources_fit"]  # 10 photos: 5 held out, 2 set the threshold, 3 fit
    assert fit_sources == 3
    assert all(f["folds"] == fit_sources and f["sources"] == fit_sources and f["folds_not_out_of_fold"] == []
               for f in fits.values())
    # fitted on the fit split only: never on the rows that set the threshold or measure the FPR
    assert fits["lid"]["clean_rows"] == loaded.data["clean_fit"] and fits["lid"]["adversarial_rows"] > 0
    assert loaded.results["operating_points"][0]["threshold_set_on"]["splits"] == ["threshold"]
    assert loaded.results["combiner"] == "refitted on the fit split" and loaded.job["refit_signals"] is True
    # the refitted LID's reference set is drawn from the fit split's clean rows (pooled features.3, 8 channels)
    assert loaded.features["lid"].reference_array.shape == (fits["lid"]["clean_rows"], 8)

    model, identity = load_model(MODEL)
    detector = Detector.from_artifact(root / "cal.json", model=model, model_identity=identity)
    pixels = plan_clean_images(config(tiny_detector)).pixels([0, 1, 2])
    scores = detector.score(pixels)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert detector.threshold == loaded.threshold


def test_held_out_values_come_from_the_shipped_signal_and_fit_values_are_out_of_fold(tiny_detector, refitted):
    """Threshold and held-out clean rows score as the artifact scores them; fit rows carry out-of-fold values."""
    root, artifact = refitted
    job = CalibrationJob(config(tiny_detector), root / "work", progress=False)
    _, result, banks = job.finalize()
    plan = job.plan
    model, identity = load_model(MODEL)
    detector = Detector.from_artifact(root / "cal.json", model=model, model_identity=identity)
    held = [i for i in range(len(plan.candidates)) if plan.role(i) == "holdout"]
    threshold = [i for i in range(len(plan.candidates)) if plan.role(i) == "threshold"]
    fit = [i for i in range(len(plan.candidates)) if plan.role(i) == "fit"]
    assert held and threshold and fit and len(held) + len(threshold) + len(fit) == len(plan.candidates)
    with torch.no_grad():
        held_scores = detector.score(plan.pixels(held)).double().numpy()
        threshold_scores = detector.score(plan.pixels(threshold)).double().numpy()
        fit_scores = detector.score(plan.pixels(fit)).double().numpy()
    # min_confidence 0: every candidate is selected, in plan order within each split
    assert np.allclose(np.sort(result.scores["clean_holdout"]), np.sort(held_scores), rtol=1e-3, atol=1e-3)
    # the threshold is set on the shipped pipeline's scores of rows no signal and no combiner was fitted on
    assert np.allclose(np.sort(result.scores["clean_threshold"]), np.sort(threshold_scores), rtol=1e-3, atol=1e-3)
    assert artifact.threshold == pytest.approx(result.threshold)
    # in-sample fit scores (the shipped signals) are not the out-of-fold ones the threshold was fitted on
    assert not np.allclose(np.sort(result.scores["clean_fit"]), np.sort(fit_scores), rtol=1e-3, atol=1e-3)


def test_out_of_fold_value_equals_a_fit_without_the_rows_source():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(5), 8)  # 5 sources, 5 folds: each fold is one source
    clean = np.tile(np.r_[np.ones(5, bool), np.zeros(3, bool)], 5)
    raw = torch.from_numpy(rng.normal(size=(40, 6)).astype(np.float32) + 2.0 * (~clean)[:, None])
    weight = np.ones(40)
    template = LocalIntrinsicDimensionality(layer="x", k=3)  # keeps every clean row: the fit does not depend on the seed
    result = cross_fit(template, raw, groups, clean, ~clean, weight, seed=0)
    assert result.folds == 5 and result.fallback_folds == ()
    for source in range(5):
        rows = groups == source
        without = fit_signal(template, raw, clean & ~rows, ~clean & ~rows, weight, seed=0)
        assert np.allclose(result.out_of_fold[rows], signal_values(without, raw[torch.from_numpy(rows)]))
    # and not the in-sample value: a clean row is its own neighbour in the all-rows reference set
    in_sample = signal_values(result.signal, raw)
    assert not np.allclose(result.out_of_fold[clean], in_sample[clean])
    assert np.allclose(result.signal.reference_array, raw[torch.from_numpy(clean)].numpy(), atol=1e-2)
    # a Fourier read-out (logistic regression, adversarial weights) is cross-fitted the same way
    fourier = FourierFeatures(radial_bins=4, angular_bins=2)
    crossed = cross_fit(fourier, raw, groups, clean, ~clean, weight, seed=0)
    rows = groups == 2
    without = fit_signal(fourier, raw, clean & ~rows, ~clean & ~rows, weight, seed=2)
    assert np.allclose(crossed.out_of_fold[rows], signal_values(without, raw[torch.from_numpy(rows)]))
    with pytest.raises(ValueError, match="at least 2"):
        cross_fit(fourier, raw, np.zeros(40), clean, ~clean, weight)


def test_refit_signals_is_refused_without_local_activations_or_learned_signals(tiny_detector, tmp_path):
    square = (AttackSpec.parse("square:eps=0.05,n_queries=5"),)
    with pytest.raises(JobConfigError, match="--refit-signals needs the raw parts.*only a local model"):
        JobConfig(model="triton", triton_url="h:1", triton_model="m", attacks=square, refit_signals=True)
    with pytest.raises(JobConfigError, match="--score-via-triton"):
        JobConfig(model=MODEL, score_via_triton=True, triton_url="h:1", triton_model="m", attacks=square, refit_signals=True)
    assert JobConfig(refit_signals=True).refit_combiner is True  # implied
    with pytest.raises(JobConfigError, match="no learned signal"):
        CalibrationJob(config("paper"), tmp_path / "w", progress=False)

    from service.cli import app

    refused = CliRunner().invoke(app, ["calibrate", "run", "--out", str(tmp_path / "x.json"), "--model", "triton",
                                       "--triton-url", "h:1", "--triton-model", "m", "--attack", "square",
                                       "--refit-signals"])
    assert refused.exit_code == 2 and "only a local model" in refused.output


def test_units_with_raw_parts_have_their_own_keys(tiny_detector, refitted):
    root, _ = refitted
    with_raw = CalibrationJob(config(tiny_detector), root / "work", progress=False)
    without = CalibrationJob(config(tiny_detector, refit_signals=False), root / "work", progress=False)
    assert with_raw.clean_key != without.clean_key
    spec = with_raw.config.attacks[0]
    assert with_raw.attack_key(spec) != without.attack_key(spec)
    unit = with_raw.store.load(f"clean-{with_raw.clean_key}-00000.pt")
    assert set(unit["raw"]) == set(LEARNED) and len(unit["raw"]["head"]) == len(unit["entropies"])
    assert unit["raw"]["head"].dtype == torch.float16 and unit["raw"]["lid"].dtype == torch.float32


def test_shards_merge_into_the_single_runs_refitted_artifact(tiny_detector, refitted, tmp_path):
    root, _ = refitted
    from service.cli import app

    runner = CliRunner()
    common = ["--model", MODEL, "--detector", str(tiny_detector), "--image-size", "32", "--crops-per-photo", "4",
              "--min-confidence", "0", "--n-boot", "20", "--chunk-size", "8", "--target-fpr", "0.1",
              "--attack", ATTACK, "--refit-signals", "--no-progress"]
    for index in range(2):
        result = runner.invoke(app, ["calibrate", "run", "--shard", f"{index}/2", "--work-dir", str(tmp_path / f"s{index}"), *common])
        assert result.exit_code == 0, result.output
    merged = runner.invoke(app, ["calibrate", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m.json")])
    assert merged.exit_code == 0, merged.output
    document = json.loads((tmp_path / "m.json").read_text())
    expected = json.loads((root / "cal.json").read_text())
    assert document["features"] == expected["features"] and document["combiner"] == expected["combiner"]
    assert document["threshold"] == expected["threshold"] and document["results"] == expected["results"]
