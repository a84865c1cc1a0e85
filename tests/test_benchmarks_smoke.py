"""Every benchmark runs end to end in its smoke mode, so none of them can rot."""

from __future__ import annotations

import json

import pytest


def test_entropy_kernel_benchmark_smoke(tmp_path):
    from benchmarks.entropy_kernel import main

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "entropy_kernel_smoke.json").read_text())
    row = result["rows"][0]
    assert row["max_abs_error"] <= 1e-5
    assert row["advsentry_maps_per_s"] > 0 and row["skimage_maps_per_s"] > 0
    assert result["machine"]["cpu_count"] >= 1
    assert [r["levels"] for r in result["levels"]] == [16, 4096]


@pytest.mark.slow
def test_detection_study_smoke(tmp_path):
    """The whole study pipeline on a handful of images: data, attacks, banks, selection, tables, figures."""
    from benchmarks.detection_study.__main__ import main
    from detector import CalibrationArtifact, Detector

    main(["--smoke", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data"]["dev"] > 0 and results["data"]["test"] > 0
    assert not set(results["data"]["test_photos"]) & set(results["data"]["dev_photos"])
    assert set(results["test"]) == {"paper", "best_single", "combined", "combined_seen", "combined_unconstrained", "feature_squeezing"}
    for table in results["test"].values():
        for row in table.values():
            assert 0.0 <= row["auc"]["value"] <= 1.0 or row["adversarial"] == 0
    assert results["default_detector"] in ("best_single", "combined")
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| attack | detector |" in markdown and "(a) paper's method" in markdown
    assert (tmp_path / "out" / "roc_test.png").stat().st_size > 0
    # The chosen detector is written as an artifact the product loads.
    artifact = CalibrationArtifact.load(tmp_path / "out" / "default_detector.json")
    detector = Detector.from_artifact(tmp_path / "out" / "default_detector.json")
    assert detector.threshold == artifact.threshold
    # A rerun finds everything in the cache and gives the same selection.
    main(["--smoke", "--out", str(tmp_path / "again"), "--cache", str(tmp_path / "cache")])
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["dev_selection"] == results["dev_selection"]
