"""Honest calibrations: minimum sample sizes, exact / by-source intervals, the real-photo corpus as clean source.

The jobs here run on the small CNN of ``calibrate_models`` (32x32 inputs) with
one cheap attack, so each takes a few seconds. The corpus is a fake one made
in tmp (PNGs + ``manifest.json`` in the ``advsentry.corpus/v1`` layout); the
``conftest`` fixture keeps any corpus installed on the machine out of the way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from detector.calibrate import JobConfig, JobConfigError
from detector.calibrate.data import CORPUS_ORIGIN, plan_clean_images
from detector.calibrate.intervals import clopper_pearson, cluster_auc, cluster_rate, rate_interval
from detector.calibrate.sufficiency import SampleSize, required_sizes
from detector.calibration import CalibrationArtifact

TINY = ["--model", "calibrate_models:target_cnn", "--detector", "paper", "--image-size", "32", "--min-confidence", "0",
        "--n-boot", "50", "--chunk-size", "4", "--attack", "fgsm:eps=0.0314", "--no-progress"]


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    from service.cli import app

    return CliRunner().invoke(app, ["calibrate", *args])


def _stderr(result) -> str:  # type: ignore[no-untyped-def]
    try:
        return result.stderr
    except ValueError:  # runners that mix stderr into output
        return result.output


# ---- intervals -------------------------------------------------------------------------------------


def test_clopper_pearson_is_exact_and_never_collapses():
    low, high = clopper_pearson(0, 2)
    assert low == 0.0 and high == pytest.approx(0.8419, abs=1e-3)
    entry = rate_interval(10, 200)
    assert (entry["k"], entry["n"], entry["value"]) == (10, 200, 0.05)
    assert entry["low"] == pytest.approx(0.0242, abs=1e-3) and entry["high"] == pytest.approx(0.0900, abs=1e-3)
    assert clopper_pearson(0, 0) is None and rate_interval(0, 0)["low"] is None


def test_auc_by_source_matches_sklearn_and_refuses_an_interval_with_few_sources():
    from detector.evaluation import auc

    rng = np.random.default_rng(0)
    clean, adversarial = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    clean[:5] = adversarial[:5]  # ties count half, as in sklearn
    many = cluster_auc(clean, adversarial, rng.integers(0, 30, 300), rng.integers(0, 25, 200), n_boot=200)
    assert many["value"] == pytest.approx(auc(clean, adversarial)) and many["meaningful"]
    assert many["low"] < many["value"] < many["high"]
    # 30 images from 3 sources: a value, but no interval pretending to be precise
    few = cluster_auc(clean[:30], adversarial, np.repeat([0, 1, 2], 10), rng.integers(0, 25, 200))
    assert few["low"] is None and few["high"] is None and few["note"] == "not meaningful: 3 sources"
    # sources, not images, are what is resampled: one source copied 10 times is as wide as the source once
    wide = cluster_auc(np.repeat(clean[:20], 10), adversarial[:200], np.repeat(np.arange(20), 10), np.arange(200), n_boot=300)
    narrow = cluster_auc(np.repeat(clean[:20], 10), adversarial[:200], np.arange(200), np.arange(200), n_boot=300)
    assert wide["high"] - wide["low"] > 1.5 * (narrow["high"] - narrow["low"])


def test_cluster_rate_redraws_sources_not_inputs():
    # 40 sources of 10 inputs each, every input of a source flagged together: 8 of 40 sources flagged
    flags = np.repeat(np.arange(40) < 8, 10)
    clustered = cluster_rate(flags, np.repeat(np.arange(40), 10), n_boot=400)
    independent = cluster_rate(flags, np.arange(400), n_boot=400)
    assert clustered["value"] == independent["value"] == pytest.approx(0.2)
    assert clustered["low"] < 0.2 < clustered["high"] and clustered["sources"] == 40
    # 400 inputs that behave as 40: the interval is as wide as 40 draws, far wider than 400 independent ones
    assert clustered["high"] - clustered["low"] > 2.5 * (independent["high"] - independent["low"])
    assert cluster_rate(np.zeros(0), np.zeros(0))["value"] is None


def test_minimums_follow_the_target_fpr():
    # the threshold's rows: the threshold split after a refit, the fit and threshold splits together otherwise
    assert required_sizes(0.05) == {"clean_threshold": 100, "clean_holdout": 200, "sources_threshold": 10, "sources_holdout": 20}
    assert required_sizes(0.01)["clean_holdout"] == 1000 and required_sizes(0.01)["clean_threshold"] == 500
    assert required_sizes(0.05, refit=True)["clean_fit"] == 100 and required_sizes(0.05, refit=True)["sources_fit"] == 10
    refit = SampleSize(300, 300, 40, 40, 0.05, {"fgsm": 100}, clean_threshold=50, sources_threshold=5, refit=True)
    assert "clean images setting the threshold (threshold split): 50 < 100 needed" in refit.shortfalls
    assert SampleSize(60, 300, 6, 40, 0.05, clean_threshold=60, sources_threshold=6).sufficient  # 120 rows, 12 sources
    enough = SampleSize(300, 300, 40, 40, 0.05, {"fgsm": 100})
    assert enough.sufficient and enough.warning() is None
    few = SampleSize(2, 2, 1, 1, 0.05, {"fgsm": 3})
    assert not few.sufficient and "clean held-out images: 2 < 200 needed" in few.warning()
    assert "fgsm 3" in few.warning()


# ---- a tiny job: warned, recorded, refused --------------------------------------------------------


def test_tiny_job_warns_on_stderr_and_records_insufficient_sample(tmp_path):
    result = _invoke("run", "--out", str(tmp_path / "cal.json"), "--report", str(tmp_path / "cal.html"), *TINY)
    assert result.exit_code == 0, result.output
    stderr = _stderr(result)
    assert stderr.count("TOO FEW CLEAN IMAGES") == 2  # at the start (candidates) and at the end (images used)
    assert "!! WARNING:" in stderr and "< 200 needed" in stderr

    artifact = CalibrationArtifact.load(tmp_path / "cal.json")  # checksum still verifies with the new fields
    size = artifact.data["sample_size"]
    assert size["sufficient"] is False and "TOO FEW CLEAN IMAGES" in size["warning"]
    assert size["clean_fit"] + size["clean_threshold"] + size["clean_holdout"] + size["clean_mixed"] == 20
    assert size["sources_fit"] + size["sources_threshold"] + size["sources_holdout"] == 10
    assert size["threshold_set_on"] == {"splits": ["fit", "threshold"], "clean": size["clean_fit"] + size["clean_threshold"],
                                        "sources": size["sources_fit"] + size["sources_threshold"]}  # nothing refitted
    assert size["adversarial_per_attack"]["fgsm"] == artifact.results["attacks"]["fgsm"]["successful"]
    assert size["required"]["clean_holdout"] == 200

    point = artifact.results["operating_points"][0]
    exact = point["held_out_fpr_interval"]
    assert exact["method"].startswith("Clopper-Pearson") and exact["n"] == point["held_out_clean"]
    assert exact["low"] <= point["held_out_fpr"] <= exact["high"] and exact["high"] - exact["low"] > 0.1
    fgsm = artifact.results["attacks"]["fgsm"]
    assert fgsm["auc_by_source"]["note"] == f"not meaningful: {fgsm['auc_by_source']['sources_clean']} sources"
    assert fgsm["auc_by_source"]["low"] is None and "auc" in fgsm["detection"]  # old keys kept
    assert set(fgsm["tpr_at_threshold_interval"]) == set(fgsm["tpr_at_threshold"])

    report = (tmp_path / "cal.html").read_text()
    assert "id='insufficient-sample'" in report and report.index("insufficient-sample") < report.index("Operating points")
    assert "TOO FEW CLEAN IMAGES" in report and "not meaningful" in report and "Sample size" in report
    assert "not meaningful" in result.stdout and "BELOW THE MINIMUMS" in result.stdout  # terminal summary


def test_min_samples_strict_refuses_with_exit_2_and_off_stays_quiet(tmp_path):
    refused = _invoke("run", "--out", str(tmp_path / "cal.json"), "--min-samples", "strict", *TINY)
    assert refused.exit_code == 2
    assert "--min-samples strict" in refused.output and "at least 200 clean held-out images" in refused.output
    assert not (tmp_path / "cal.json").exists() and not (tmp_path / "cal.json.work").exists()  # refused before any work

    quiet = _invoke("run", "--out", str(tmp_path / "quiet.json"), "--min-samples", "off", *TINY)
    assert quiet.exit_code == 0, quiet.output
    assert "WARNING" not in _stderr(quiet)
    assert CalibrationArtifact.load(tmp_path / "quiet.json").data["sample_size"]["sufficient"] is False

    bad = _invoke("run", "--out", str(tmp_path / "x.json"), "--min-samples", "sometimes", *TINY)
    assert bad.exit_code == 2 and "strict, warn, off" in bad.output


# ---- the real-photo corpus as clean source --------------------------------------------------------


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch) -> tuple[Path, dict]:
    """16 dev images from 8 sources and 6 test images, 224x224 PNGs; ``ADVSENTRY_CORPUS_DIR`` points at them."""
    from PIL import Image

    root = tmp_path / "corpus"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(22):
        split = "dev" if i < 16 else "test"
        image_id = f"{split}{i:03d}"
        path = root / "images" / f"{image_id}.png"
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(path)
        entries.append({
            "id": image_id, "file": f"images/{image_id}.png", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "split": split, "source": f"src{i % 8}" if split == "dev" else f"testsrc{i % 3}", "kind": "photo",
            "provenance": [{"origin": "test fixture"}], "label": 1, "label_name": "goldfish", "confidence": 0.9,
        })
    manifest = {"schema": "advsentry.corpus/v1", "images": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("ADVSENTRY_CORPUS_DIR", str(root))
    return root, manifest


def test_corpus_job_uses_only_the_dev_part_and_records_its_origin(fake_corpus, tmp_path):
    root, manifest = fake_corpus
    result = _invoke("run", "--out", str(tmp_path / "cal.json"), "--clean-source", "corpus", *TINY)
    assert result.exit_code == 0, result.output
    data = CalibrationArtifact.load(tmp_path / "cal.json").data
    dev = {e["id"]: e["sha256"] for e in manifest["images"] if e["split"] == "dev"}
    assert data["origin"] == CORPUS_ORIGIN == "advsentry real-photo corpus (dev part)"
    assert data["clean_source"] == "corpus" and data["corpus"]["part"] == "dev" and data["corpus"]["root"] == str(root)
    assert data["source_files_sha256"] == dev  # only dev images, hashes from the manifest
    assert data["candidates"] == 16 and data["sources"] == 8  # grouped by the manifest's source
    size = data["sample_size"]
    assert size["sources_fit"] + size["sources_threshold"] + size["sources_holdout"] == 8


def test_auto_takes_the_corpus_for_the_bundled_model_and_caps_it_across_sources(fake_corpus):
    root, _ = fake_corpus
    assert JobConfig(model="bundled").resolved_clean_source() == "corpus"
    assert JobConfig(model="bundled", clean_source="bundled").resolved_clean_source() == "bundled"
    assert JobConfig(model="calibrate_models:target_cnn").resolved_clean_source() == "bundled"  # a user's model
    assert JobConfig(images=(str(root),)).resolved_clean_source() == "files"
    assert JobConfig(model="bundled").image_cap == 600 and JobConfig(model="bundled", clean_source="bundled").image_cap is None
    plan = plan_clean_images(JobConfig(model="bundled", max_images=8, image_size=32))
    assert len(plan.candidates) == 8 and len({c.group for c in plan.candidates}) == 8  # one per source first
    assert all(c.name.startswith("dev") for c in plan.candidates)


def test_corpus_requested_but_not_installed_is_a_clear_usage_error(tmp_path):
    result = _invoke("run", "--out", str(tmp_path / "cal.json"), "--clean-source", "corpus", *TINY)
    assert result.exit_code == 2
    assert "no advsentry real-photo corpus installed at" in result.output and "--clean-source bundled" in result.output
    missing = _invoke("run", "--out", str(tmp_path / "cal.json"), "--corpus", str(tmp_path / "nowhere"), *TINY)
    assert missing.exit_code == 2 and "nowhere" in missing.output
    with pytest.raises(JobConfigError, match="exclude each other"):
        JobConfig(images=("x",), clean_source="bundled")


def test_own_images_and_the_corpus_in_one_job(fake_corpus, tmp_path):
    """--images with --clean-source corpus: the user's files and the corpus's dev part, interleaved, split together."""
    from PIL import Image

    mine = tmp_path / "mine"
    mine.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(mine / f"own{i}.png")
    config = JobConfig(images=(str(mine),), clean_source="corpus", max_images=8, image_size=32)
    assert config.resolved_clean_source() == "corpus+files"
    plan = plan_clean_images(config)
    names = [c.name for c in plan.candidates]
    assert len(names) == 5 + 8 and sum(n.startswith("mine/own") for n in names) == 5  # every file, the corpus capped
    assert names[0].startswith("mine/") and names[1].startswith("dev")  # interleaved: any prefix has both
    assert not any(n.startswith("test") for n in names)  # never the corpus's test part
    data = plan.description
    assert data["clean_source"] == "corpus+files" and data["image_files"] == 5 and data["corpus"]["part"] == "dev"
    assert data["sources"] == 5 + 8 and "image files" in data["origin"] and "corpus" in data["origin"]
    assert {r for r in plan.roles} <= {"fit", "threshold", "holdout", "out"}
    result = _invoke("run", "--out", str(tmp_path / "cal.json"), "--images", str(mine), "--clean-source", "corpus",
                     "--max-images", "8", *TINY)
    assert result.exit_code == 0, result.output
    assert CalibrationArtifact.load(tmp_path / "cal.json").data["candidates"] == 13


def test_clean_images_upscaled_to_the_image_size_are_counted_and_warned_about(fake_corpus, tmp_path):
    """The corpus stores 224 px crops: a 260 px calibration would see them all upscaled (smoother than real inputs)."""
    from detector.calibrate.data import upscaling_warning

    at_224 = plan_clean_images(JobConfig(model="bundled", max_images=8, image_size=224)).description
    at_260 = plan_clean_images(JobConfig(model="bundled", max_images=8, image_size=260)).description
    assert at_224["upscaled_candidates"] == 0 and upscaling_warning(at_224) is None
    assert at_260["upscaled_candidates"] == 8
    assert "8 of 8 clean images are smaller than --image-size 260 and are UPSCALED" in upscaling_warning(at_260)
    result = _invoke("run", "--out", str(tmp_path / "cal.json"), "--clean-source", "corpus",
                     *[a if a != "32" else "300" for a in TINY])
    assert result.exit_code == 0, result.output
    assert "UPSCALED" in _stderr(result)
    artifact = CalibrationArtifact.load(tmp_path / "cal.json")
    assert artifact.data["upscaled_candidates"] == 16
    from detector.calibrate.report import upscaling_banner

    assert "clean images upscaled" in upscaling_banner(artifact) and "16 of 16" in upscaling_banner(artifact)
