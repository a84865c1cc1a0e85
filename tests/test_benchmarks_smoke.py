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
def test_proxy_overhead_benchmark_smoke(tmp_path):
    """Real Triton (identity model) + `advsentry serve` child process + the load generator, a second per cell."""
    from benchmarks.proxy_overhead import main

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "proxy_overhead_smoke.json").read_text())
    identity = result["identity"]
    assert "advsentry_score" in identity["annotation_example"]
    assert {(r["concurrency"], r["mode"]) for r in identity["rows"]} == {
        (c, m) for c in (1, 4) for m in ("unary", "streaming")}
    for row in identity["rows"]:
        assert row["direct"]["requests"] > 0 and row["sidecar"]["requests"] > 0
        assert row["python_floor"]["requests"] > 0  # the byte-forwarder reference answered too
        assert row["vs_direct"]["throughput_ratio"] > 0 and row["vs_python_floor"]["throughput_ratio"] > 0
    assert len(result["load_average_start"]) == 3


@pytest.mark.slow
def test_detection_cost_benchmark_smoke(tmp_path):
    from benchmarks.detection_cost import main
    from detector import Detector

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "detection_cost_smoke.json").read_text())
    assert list(result["detector"]["features"]) == list(Detector.default().feature_outputs)
    for row in result["rows"]:
        assert set(row["breakdown_ms_per_image"]) == {
            "forward_autograd", "guided_backward", "gray", "entropy", "combine", "serialization"}
        assert row["ratio_to_plain_forward"] > 0


@pytest.mark.slow
def test_sidecar_memory_benchmark_smoke(tmp_path):
    from benchmarks.sidecar_memory import main

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "sidecar_memory_smoke.json").read_text())
    assert result["requests"] > 0 and result["rss_start_mib"] > 0 and result["rss_end_mib"] > 0
    assert len(result["samples"]) >= 2


def test_load_generator_refuses_non_loopback_targets():
    from benchmarks.loadgen import check_loopback

    for target in ("127.0.0.1:8001", "localhost:8001", "[::1]:8001"):
        check_loopback(target)
    for target in ("10.0.0.1:8001", "example.com:8001", "0.0.0.0:8001"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(target)


def test_report_renders_every_goal_row_from_results(tmp_path):
    """The README generator on the committed results (or none): five goal rows, never a crash."""
    from benchmarks.common import RESULTS_DIR
    from benchmarks.report import render

    for results in (RESULTS_DIR, tmp_path):
        text = render(results)
        for goal in ("1. entropy kernel", "2. proxy overhead", "3. detection cost", "4. memory", "5. "):
            assert f"| {goal}" in text
    assert "not measured" in render(tmp_path)


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


@pytest.mark.slow
def test_corpus_study_smoke(tmp_path):
    """The corpus study's pipeline on bundled crops: attacks, signal banks, selection, tables, transfer, fooling, adaptive."""
    from benchmarks.corpus_study.__main__ import main
    from detector import CalibrationArtifact, Detector

    main(["--smoke", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data"]["dev"]["images"] > 0 and results["data"]["test"]["images"] > 0
    chosen = results["selection"]["chosen"]
    assert chosen["features"] and chosen["extra_forwards"] <= results["settings"]["budget"]
    assert set(results["test"]) >= {"paper", "feature_squeezing", "best_single", "chosen", "first_study_default"}
    for table in results["test"].values():
        for row in table.values():
            assert 0.0 <= row["auc"]["value"] <= 1.0 or row["adversarial"] == 0
    for targets in results["threshold_transfer"].values():
        for row in targets.values():
            assert 0.0 <= row["low"] <= row["value"] <= row["high"] <= 1.0 and row["n"] == results["data"]["test"]["images"]
    rows = results["adaptive"]["rows"]
    assert {(r["eps_255"], r["weight"]) for r in rows} == {(e, w) for e in (2, 4, 8) for w in (0.0, 1.0, 10.0)}
    assert all(0.0 <= r["correct_or_flagged"] <= 1.0 for r in rows)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "## Threshold transfer" in markdown and "## Adaptive attack" in markdown
    # The chosen detector is an artifact the product loads, with the signals it selected.
    artifact = CalibrationArtifact.load(tmp_path / "out" / "default_detector.json")
    assert list(artifact.features) == chosen["features"]
    detector = Detector.from_artifact(tmp_path / "out" / "default_detector.json")
    assert detector.threshold == artifact.threshold
    # A rerun finds everything in the cache and makes the same choice.
    main(["--smoke", "--out", str(tmp_path / "again"), "--cache", str(tmp_path / "cache")])
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["selection"] == results["selection"]
