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
def test_blackbox_cost_benchmark_smoke(tmp_path):
    from benchmarks.blackbox_cost import main
    from detector import Detector

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "blackbox_cost_smoke.json").read_text())
    assert result["calibration_id"] == Detector.named("blackbox").calibration_id and result["extra_upstream_calls"] == 0
    assert [row["batch"] for row in result["rows"]] == [1] and result["rows"][0]["signals_ms_per_image"] > 0
    squeeze = result["detectors"]["blackbox-squeeze"]
    assert squeeze["extra_upstream_calls"] == 2 and squeeze["rows"][0]["upstream_forward_passes"] == 3
    served = result["served"]
    # counted by the real Triton: one model inference per request directly and with `blackbox`, three with squeezing
    assert served["direct"]["model_inferences_per_request"] == served["blackbox"]["model_inferences_per_request"] == 1
    assert served["blackbox-squeeze"]["model_inferences_per_request"] == 3
    assert served["blackbox"]["scored"] and served["blackbox-squeeze"]["scored"] and not served["direct"]["scored"]


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


def test_threshold_inputs_share_no_original_with_fitted_ones():
    """The corpus study's threshold protocol: an input is held only if every original it was made from is held."""
    import numpy as np

    from benchmarks.corpus_study.run import dev_roles

    # 40 photos (one original each) and 60 composites of 20 cut-outs on 10 shared backgrounds
    rng = np.random.default_rng(1)
    originals = [frozenset([f"photo{i}"]) for i in range(40)]
    originals += [frozenset([f"cutout{i % 20}", f"background{rng.integers(10)}"]) for i in range(60)]
    roles = dev_roles(originals, 0.25, seed=0)
    held = set().union(*(o for o, r in zip(originals, roles) if r == "held"))
    fitted = set().union(*(o for o, r in zip(originals, roles) if r == "fit"))
    assert held and fitted and not held & fitted  # no background, cut-out or photo on both sides
    assert {"held", "fit", "out"} <= set(roles)  # composites mixing both sides are used for nothing
    assert (dev_roles(originals, 0.0, seed=0) == "fit").all()
    assert (dev_roles(originals, 0.25, seed=0) == roles).all()  # seeded


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


# --- traffic calibration (issue 12) ---
def test_traffic_calibration_benchmark_smoke(tmp_path):
    """Synthetic scores through the real path (TrafficState -> state file -> calibrate_from_traffic)."""
    from benchmarks.traffic_calibration import main

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "traffic_calibration_smoke.json").read_text())
    assert set(result["scenarios"]) == {"dev->test", "test half->other half"}
    for scenario in result["scenarios"].values():
        rows = scenario["rows"]
        assert {(r["adversarial_share"], r["target_fpr"], r["trim"]) for r in rows} == {
            (a, t, r) for a in (0.0, 0.01, 0.05) for t in (0.01, 0.05) for r in (0.0, 0.01, 0.05)}
        for row in rows:
            assert row["sketch_vs_exact_max_relative"] <= 0.005 + 1e-9  # the sketch's relative accuracy
            fpr = row["realized_fpr"]
            assert 0.0 <= fpr["low"] <= fpr["value"] <= fpr["high"] <= 1.0
        # more trim, lower threshold (more alarms), for the same stream and target
        by = {(r["adversarial_share"], r["target_fpr"], r["trim"]): r["threshold_median"] for r in rows}
        assert by[(0.05, 0.01, 0.05)] < by[(0.05, 0.01, 0.0)]
    assert "| attacks in stream |" in (tmp_path / "traffic_calibration_smoke.md").read_text()


# --- fuzzing and fault soak (issue 13) ---
@pytest.mark.slow
def test_fuzz_benchmark_smoke(tmp_path):
    """A few hundred fuzzed requests through a real sidecar and Triton: counted, no broken rule."""
    from benchmarks.fuzz import main

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "fuzz_smoke.json").read_text())
    totals = result["totals"]
    assert result["complete"] and totals["requests"] == 300
    assert sum(totals["codes"].values()) >= totals["requests"]
    assert totals["problems"] == 0 and totals["hangs"] == 0 and totals["crashes"] == 0, totals["examples"]
    assert totals["not_serving_checks"] == 0


@pytest.mark.slow
def test_fault_soak_benchmark_smoke(tmp_path):
    """One minute of load with one Triton SIGKILL + restart: every call ended, no message lost or duplicated."""
    from benchmarks.fault_soak import main

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "fault_soak_smoke.json").read_text())
    streams = result["streams"]
    assert result["hangs"] == 0
    assert streams["lost"] == 0 and streams["duplicated"] == 0 and streams["unknown_ids"] == 0
    assert streams["accounted"] == streams["messages_sent"] > 0
    assert len(result["restarts"]) == 1 and result["restarts"][0]["ready_at_s"] is not None
    assert result["sidecar_alive_at_end"]
    assert (tmp_path / "fault_soak_smoke.md").read_text().startswith("# Fault soak")


# --- issue 11: black box with probing through a real Triton (benchmarks/corpus_study/blackbox.py) ---
@pytest.mark.slow
def test_corpus_blackbox_smoke(tmp_path):
    """Square and HopSkipJump as a remote client of a real Triton on bundled crops, then the detector on Triton's [B, F]."""
    from benchmarks.corpus_study.blackbox import main

    args = ["--smoke", "--cache", str(tmp_path / "cache")]
    main([*args, "--out", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "blackbox.json").read_text())
    assert set(results["attacks"]) == {"square_linf_8", "hopskipjump"}
    for attack in results["attacks"].values():
        assert attack["attempted"] >= 1
        check = attack["query_crosscheck"]  # every image the client sent is one Triton inference
        assert check["sent_by_client"] > 0 and check["equal"]
    square = results["attacks"]["square_linf_8"]
    assert square["successful"] == 0 or square["linf_255_max"] <= 8 + 1e-3
    for by_detector in results["detection"].values():
        assert set(by_detector) == {"default", "feature_squeezing", "paper"}
        for entry in by_detector.values():
            assert entry["adversarial"] == 0 or 0.0 <= entry["auc"]["value"] <= 1.0
    assert "Detection of the successful 8-bit adversarials" in (tmp_path / "out" / "blackbox.md").read_text()
    # A rerun is served from the per-input cache: no attack query reaches Triton, same outcomes.
    main([*args, "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "blackbox.json").read_text())
    for name, attack in again["attacks"].items():
        assert attack["query_crosscheck"]["sent_by_client"] == 0
        assert attack["successful"] == results["attacks"][name]["successful"]


def test_probing_benchmark_smoke(tmp_path):
    """Probing detection (issue 12): offline attack streams, clean clients and the video burst through ProbingDetector."""
    from benchmarks.probing import main

    args = ["--smoke", "--results-dir", str(tmp_path), "--cache", str(tmp_path / "cache")]
    main(args)
    result = json.loads((tmp_path / "probing_smoke.json").read_text())
    assert set(result["embedding_choice"]["candidates"]) == {"pixels16_proj64", "penultimate_proj64"}
    assert result["threshold"]["chosen"] > 0 and result["clean_test"]["clients"] == 20
    assert result["video"]["queries_until_detection"] is not None  # near-duplicate frames look like probing
    for row in result["attacks_offline_detection"].values():
        assert row["queries_sent"] > 0
    assert "| history | observe() median |" in (tmp_path / "probing_smoke.md").read_text()
    # A rerun reuses the recorded attack streams and finished stages.
    again = main(args)
    assert again["attacks_offline"] == result["attacks_offline"]


@pytest.mark.slow
def test_disclosure_evasion_benchmark_smoke(tmp_path):
    """Disclosure (issue 13): the score-guided search vs the verdict-only one, through Triton + two sidecars."""
    from benchmarks.disclosure_evasion import main

    main(["--smoke", "--results-dir", str(tmp_path)])
    result = json.loads((tmp_path / "disclosure_evasion_smoke.json").read_text())
    assert set(result["modes"]) == {"score", "verdict"}
    rows = result["rows"]
    assert len(rows) == 2 and {r["mode"] for r in rows} == {"score", "verdict"}
    for row in rows:
        assert row["status"] in ("evaded", "budget_exhausted", "not_flagged", "no_start", "not_adversarial_remotely")
        assert row["queries"] <= 6
    # the verdict-only attacker never sees a score
    assert all(r.get("first_score") is None for r in rows if r["mode"] == "verdict")
    assert "| disclosure |" in (tmp_path / "disclosure_evasion_smoke.md").read_text()
