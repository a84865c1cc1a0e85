"""Traffic calibration (issue 12, part 1): the score sketch, its persistence and merge, ``calibrate traffic``, GetStatus.

Unit tests check the sketch against exact numpy quantiles on known data; the
end-to-end tests (``slow``) run a real Triton and real in-process sidecars:
persistence across a restart, two replicas merging into the threshold of one
sidecar that saw both streams, the artifact hot-reloading, and GetStatus's
traffic-implied FPR matching the flags the sidecar actually returned.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from service.hooks.traffic import (
    TrafficState,
    TrafficStateError,
    fraction_above,
    merge_states,
    new_sketch,
    quantile,
    sketch_from_bytes,
    sketch_to_bytes,
)

ALPHA = 0.005
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.95, 0.99)


def _scores(n: int, seed: int) -> np.ndarray:
    """Logit-like scores: negative and positive, a few near zero."""
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(-1.5, 1.5, n - n // 10), rng.normal(3.0, 1.0, n // 10)]


def _within_accuracy(estimate: float, values: np.ndarray, q: float, alpha: float = ALPHA) -> bool:
    """DDSketch's guarantee: the value at rank q·(n−1) (either neighbour), within alpha relative to it."""
    ordered = np.sort(values)
    rank = q * (len(values) - 1)
    candidates = ordered[int(np.floor(rank))], ordered[int(np.ceil(rank))]
    return any(abs(estimate - c) <= alpha * abs(c) + 1e-12 for c in candidates)


def _state(values: np.ndarray, *, model: str = "m", calibration: str = "cal-a", threshold: float = 1.0,
           start: float = 1_000_000.0, window_s: float = 60.0) -> TrafficState:
    state = TrafficState(ALPHA, window_s=window_s, max_windows=10_000)
    for i in range(0, len(values), 7):  # requests of 7 inputs, 1 s apart
        state.add(model, "1", calibration, threshold, 0.05, values[i : i + 7], now=start + i)
    return state


def test_sketch_quantiles_are_within_the_relative_accuracy_of_the_exact_ones():
    values = _scores(20_000, 0)
    sketch = new_sketch(ALPHA)
    for v in values:
        sketch.add(float(v))
    for q in QUANTILES:
        assert _within_accuracy(quantile(sketch, q), values, q), q
    # and a coarser sketch is measurably coarser: the check can fail
    coarse = new_sketch(0.2)
    for v in values:
        coarse.add(float(v))
    assert not all(_within_accuracy(quantile(coarse, q), values, q) for q in QUANTILES)


def test_fraction_above_is_the_exact_share_except_within_the_accuracy_band():
    values = _scores(10_000, 1)
    sketch = new_sketch(ALPHA)
    for v in values:
        sketch.add(float(v))
    for threshold in (-2.0, -0.1, 0.0, 0.7, 2.5, 4.0):
        estimate = fraction_above(sketch, threshold)
        band = np.abs(values - threshold) <= 2 * ALPHA * max(abs(threshold), 1e-9)
        low, high = np.mean((values > threshold) & ~band), np.mean((values > threshold) | band)
        assert low - 1e-12 <= estimate <= high + 1e-12, threshold
    assert fraction_above(new_sketch(ALPHA), 0.0) is None


def test_sketch_bytes_round_trip_and_accuracy_mismatch_is_refused():
    sketch = new_sketch(ALPHA)
    for v in _scores(1000, 2):
        sketch.add(float(v))
    again = sketch_from_bytes(sketch_to_bytes(sketch), ALPHA)
    assert again.count == sketch.count
    assert [quantile(again, q) for q in QUANTILES] == pytest.approx([quantile(sketch, q) for q in QUANTILES], rel=1e-12)
    with pytest.raises(TrafficStateError):
        sketch_from_bytes(sketch_to_bytes(sketch), 0.01)


def test_state_persists_windows_and_refuses_a_tampered_file(tmp_path):
    values = _scores(3000, 3)
    state = _state(values)
    assert len(state.get("m", "cal-a").windows) > 1  # 60 s windows over ~3000 s
    path = tmp_path / "traffic.json"
    state.save(path)
    loaded = TrafficState.load(path)
    series = loaded.get("m", "cal-a")
    assert series.count == len(values)
    assert series.first_seen == 1_000_000.0 and series.versions == {"1"} and series.target_fpr == 0.05
    assert quantile(series.merged(ALPHA), 0.95) == quantile(state.get("m", "cal-a").merged(ALPHA), 0.95)
    document = json.loads(path.read_text())
    document["series"][0]["windows"][0]["count"] += 1
    path.write_text(json.dumps(document))
    with pytest.raises(TrafficStateError, match="count says"):
        TrafficState.load(path)
    assert not list(tmp_path.glob(".traffic.json.*"))  # the atomic write left no temporary behind


def test_old_windows_are_dropped():
    state = TrafficState(ALPHA, window_s=10.0, max_windows=3)
    for t in range(0, 100, 5):
        state.add("m", "", "cal", 0.0, None, np.array([float(t)]), now=1000.0 + t)
    windows = state.get("m", "cal").windows
    assert sorted(windows) == [1070.0, 1080.0, 1090.0]
    assert state.get("m", "cal").count == 6


def test_merging_two_replicas_equals_the_sketch_of_the_union(tmp_path):
    a, b = _scores(4000, 4), _scores(3000, 5) + 0.3
    (tmp_path / "a.json").write_bytes(_state(a).to_json())
    (tmp_path / "b.json").write_bytes(_state(b, start=1_000_500.0).to_json())
    merged = merge_states([TrafficState.load(tmp_path / "a.json"), TrafficState.load(tmp_path / "b.json")])
    union = _state(np.r_[a, b])
    m, u = merged.get("m", "cal-a").merged(ALPHA), union.get("m", "cal-a").merged(ALPHA)
    assert m.count == u.count == len(a) + len(b)
    for q in QUANTILES:
        assert quantile(m, q) == pytest.approx(quantile(u, q), rel=2 * ALPHA)
        assert _within_accuracy(quantile(m, q), np.r_[a, b], q)


def _default_calibration_id() -> str:
    from detector.detector import DEFAULT_ARTIFACT

    return DEFAULT_ARTIFACT.id


def test_calibrate_traffic_writes_an_artifact_whose_threshold_holds_the_target_on_that_traffic(tmp_path):
    from detector.calibration import CalibrationArtifact
    from detector.detector import DEFAULT_ARTIFACT
    from service.cli import app

    values = _scores(5000, 6)
    _state(values, model="efficientnet-lite0", calibration=_default_calibration_id()).save(tmp_path / "s.json")
    out = tmp_path / "cal.json"
    result = CliRunner().invoke(app, ["calibrate", "traffic", "--from", str(tmp_path / "s.json"), "--target-fpr", "0.01",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    artifact = CalibrationArtifact.load(out)
    assert artifact.target_fpr == 0.01
    assert artifact.features == DEFAULT_ARTIFACT.features and artifact.combiner == DEFAULT_ARTIFACT.combiner
    assert artifact.data["traffic"]["scores"] == len(values) and artifact.data["traffic"]["trim"] == 0.0
    assert np.mean(values > artifact.threshold) == pytest.approx(0.01, abs=0.002)
    assert _within_accuracy(artifact.threshold, values, 0.99)


def test_trim_moves_the_threshold_down_to_hold_the_clean_fpr_despite_attacks(tmp_path):
    """5 % of the stream adversarial (all high): no trim under-flags clean inputs, trim 0.05 holds the target."""
    from detector.calibration import CalibrationArtifact
    from service.cli import app

    rng = np.random.default_rng(7)
    clean, attacks = rng.normal(0, 1, 9500), rng.normal(6, 0.5, 500)
    stream = rng.permutation(np.r_[clean, attacks])
    _state(stream, model="efficientnet-lite0", calibration=_default_calibration_id()).save(tmp_path / "s.json")
    fpr = {}
    for trim in ("0", "0.05"):
        out = tmp_path / f"cal-{trim}.json"
        result = CliRunner().invoke(app, ["calibrate", "traffic", "--from", str(tmp_path / "s.json"),
                                          "--target-fpr", "0.05", "--trim", trim, "--out", str(out)])
        assert result.exit_code == 0, result.output
        fpr[trim] = np.mean(clean > CalibrationArtifact.load(out).threshold)
    assert fpr["0"] < 0.01  # the attacks took the whole 5 % tail
    assert fpr["0.05"] == pytest.approx(0.05, abs=0.01)


def test_calibrate_traffic_refuses_traffic_of_another_calibration(tmp_path):
    from service.cli import app

    _state(_scores(100, 8), calibration="cal-other").save(tmp_path / "s.json")
    result = CliRunner().invoke(app, ["calibrate", "traffic", "--from", str(tmp_path / "s.json"), "--target-fpr", "0.05",
                                      "--out", str(tmp_path / "cal.json")])
    assert result.exit_code == 2
    assert "cal-other" in result.output and not (tmp_path / "cal.json").exists()


def test_hook_publishes_gauges_persists_on_close_and_reloads(tmp_path):
    import asyncio
    import math

    from detector.detector import DEFAULT_ARTIFACT
    from service.metrics import SidecarMetrics
    from service.hooks.base import RequestContext, ScoredRequest
    from service.hooks.traffic import TrafficHook

    scores = _scores(400, 9)

    def scored(batch: np.ndarray, calibration: str | None) -> ScoredRequest:
        return ScoredRequest(RequestContext("m", ""), batch, 1.0, calibration, batch > 1.0, None, (), {}, dict)

    async def feed(hook: TrafficHook) -> None:
        for i in range(0, len(scores), 8):
            assert hook.observe(scored(scores[i : i + 8], DEFAULT_ARTIFACT.id)) == {}
        hook.observe(scored(np.array([0.5, np.nan]), "cal-unknown"))
        await hook.close()

    metrics = SidecarMetrics()
    path = tmp_path / "state" / "traffic.json"
    hook = TrafficHook(path, flush_s=3600, metrics=metrics)
    asyncio.run(feed(hook))
    gauge = metrics.registry.get_sample_value
    assert gauge("advsentry_traffic_implied_fpr", {"model": "m", "version": ""}) is not None
    assert gauge("advsentry_traffic_scores_total", {"model": "m", "version": ""}) == len(scores) + 1
    summary = hook.summary("m", DEFAULT_ARTIFACT.id, 1.0)
    assert summary.count == len(scores)
    assert summary.implied_fpr == pytest.approx(np.mean(scores > 1.0), abs=0.01)
    assert hook.state.get("m", DEFAULT_ARTIFACT.id).target_fpr == DEFAULT_ARTIFACT.target_fpr
    assert hook.state.get("m", "cal-unknown").target_fpr is None and hook.state.get("m", "cal-unknown").non_finite == 1
    # the gauges follow the series that saw the latest score (the calibration in force): its target is unknown
    assert math.isnan(gauge("advsentry_traffic_target_fpr", {"model": "m", "version": ""}))
    reloaded = TrafficHook(path)  # what a restarted sidecar reads
    assert reloaded.summary("m", DEFAULT_ARTIFACT.id, 1.0) == summary


# ---- end to end: real Triton, real sidecars ---------------------------------------------------------------


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """FP32 ``[32, 3, 224, 224]``: random crops of the bundled photos (varied scores)."""
    from detector.samples import random_crops, to_tensor

    return to_tensor([c.pixels() for c in random_crops(4, seed=3)]).numpy()[:32]


def _sidecar(triton, **settings):
    from detector.models import bundled_identity
    from e2e_triton import MODEL, RunningSidecar, make_settings

    # a generous upstream deadline: 8 signals per input on a shared 2-core CPU. The model is configured,
    # so GetStatus lists it before its first request (after a restart).
    return RunningSidecar(make_settings(upstream=triton.grpc_address, disclosure="score", upstream_timeout_s=300,
                                        models={MODEL: {}}, **settings),
                          model_identity={MODEL: bundled_identity()})


def _send(sidecar, pixels: np.ndarray, batch: int = 4) -> np.ndarray:
    """Infer through the sidecar; returns the scores it reported (one per input)."""
    import tritonclient.grpc as grpcclient

    from e2e_triton import MODEL, infer_input, outputs

    client = grpcclient.InferenceServerClient(sidecar.address)
    scores = []
    for start in range(0, len(pixels), batch):
        result = client.infer(MODEL, [infer_input(pixels[start : start + batch])], outputs=outputs("logits"))
        parameters = result.get_response().parameters
        scores.extend([float(v) for v in parameters["advsentry_scores"].string_param.split(",")]
                      if "advsentry_scores" in parameters else [parameters["advsentry_score"].double_param])
    client.close()
    return np.array(scores)


def _status(sidecar):
    import grpc

    from e2e_triton import MODEL
    from service._proto.advsentry.v1 import detector_pb2, detector_pb2_grpc

    with grpc.insecure_channel(sidecar.address) as channel:
        reply = detector_pb2_grpc.DetectorServiceStub(channel).GetStatus(detector_pb2.GetStatusRequest(), timeout=10)
    return next(m for m in reply.models if m.model_name == MODEL)


@pytest.mark.slow
def test_e2e_status_persistence_merge_and_hot_reload(triton, crops, tmp_path):
    from detector.calibration import CalibrationArtifact
    from detector.detector import DEFAULT_ARTIFACT_PATH
    from e2e_triton import wait_for
    from service.cli import app

    calibration = tmp_path / "in-force.json"
    calibration.write_bytes(DEFAULT_ARTIFACT_PATH.read_bytes())
    first, second = crops[:16], crops[16:]

    # replica A sees the first stream; GetStatus's implied FPR is the share of flags it returned
    a = _sidecar(triton, calibration=calibration, traffic_state_path=tmp_path / "a.json", traffic_flush_s=0.2)
    scores_a = _send(a, first)
    status = _status(a)
    assert status.traffic_count == len(first)
    assert status.target_fpr == pytest.approx(0.05)
    assert status.traffic_implied_fpr == pytest.approx(np.mean(scores_a > status.threshold), abs=1e-9)
    assert status.traffic_last_seen >= status.traffic_first_seen > 0
    metrics = a.sidecar.metrics.exposition().decode()
    assert f'advsentry_traffic_scores_total{{model="efficientnet-lite0",version=""}} {float(len(first))}' in metrics
    assert wait_for(lambda: (tmp_path / "a.json").exists(), timeout=5)
    a.stop()

    # a restart reads the state back
    a = _sidecar(triton, calibration=calibration, traffic_state_path=tmp_path / "a.json", traffic_flush_s=0.2)
    assert _status(a).traffic_count == len(first)

    # replica B sees the second stream; C sees both
    b = _sidecar(triton, calibration=calibration, traffic_state_path=tmp_path / "b.json")
    scores_b = _send(b, second)
    c = _sidecar(triton, calibration=calibration)
    scores_c = _send(c, np.r_[first, second])
    assert np.sort(scores_c) == pytest.approx(np.sort(np.r_[scores_a, scores_b]), abs=1e-4)

    def calibrate(sources: str, out: Path) -> CalibrationArtifact:
        result = CliRunner().invoke(app, ["calibrate", "traffic", "--from", sources, "--target-fpr", "0.1",
                                          "--base", str(calibration), "--out", str(out)])
        assert result.exit_code == 0, result.output
        return CalibrationArtifact.load(out)

    b.stop()  # B's state from its file, A's from its running sidecar (GetTrafficState)
    merged = calibrate(f"{a.address},{tmp_path / 'b.json'}", tmp_path / "merged.json")
    single = calibrate(c.address, tmp_path / "single.json")
    assert merged.data["traffic"]["scores"] == single.data["traffic"]["scores"] == len(crops)
    assert merged.threshold == pytest.approx(single.threshold, rel=2 * 0.005, abs=1e-6)
    # the target on the traffic it saw: the threshold is the order statistic at rank floor(0.9·(n−1)), within the
    # sketch's accuracy, so the inputs above it are the ones after that rank (that one itself too if the sketch's
    # value fell just below it): 4 or 5 of 32, i.e. 10 % up to the ±1/n of a quantile of 32 values
    rank = int(np.floor(0.9 * (len(crops) - 1)))
    assert int(np.sum(scores_c > single.threshold)) in (len(crops) - 1 - rank, len(crops) - rank)

    # the traffic-derived artifact hot-reloads into a running sidecar
    single_path = tmp_path / "single.json"
    calibration.write_bytes(single_path.read_bytes())
    assert wait_for(lambda: _status(a).calibration_id == single.id, timeout=15)
    assert _status(a).threshold == pytest.approx(single.threshold)
    assert _status(a).traffic_count == 0  # a new calibration starts its own series
    a.stop()
    c.stop()


@pytest.mark.slow
def test_e2e_sketches_are_for_trusted_callers_only(triton, crops):
    """With the default disclosure (verdict) an untrusted caller gets neither the sketches nor the implied FPR."""
    import grpc

    from detector.models import bundled_identity
    from e2e_triton import MODEL, RunningSidecar, make_settings
    from service._proto.advsentry.v1 import detector_pb2, detector_pb2_grpc

    from detector.detector import DEFAULT_ARTIFACT_PATH

    running = RunningSidecar(make_settings(upstream=triton.grpc_address, upstream_timeout_s=300, models={MODEL: {}},
                                           calibration=DEFAULT_ARTIFACT_PATH),
                             model_identity={MODEL: bundled_identity()})
    try:
        import tritonclient.grpc as grpcclient

        from e2e_triton import infer_input, outputs

        grpcclient.InferenceServerClient(running.address).infer(MODEL, [infer_input(crops[:2])], outputs=outputs("logits"))
        with grpc.insecure_channel(running.address) as channel:
            stub = detector_pb2_grpc.DetectorServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetTrafficState(detector_pb2.GetTrafficStateRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            status = next(m for m in stub.GetStatus(detector_pb2.GetStatusRequest(), timeout=10).models
                          if m.model_name == MODEL)
        assert status.traffic_count == 2 and not status.HasField("traffic_implied_fpr")
        assert status.HasField("target_fpr")
    finally:
        running.stop()
