"""The capture ring: within its caps at every moment, survives a restart, never blocks the request path, and
`advsentry explain --capture` reproduces the score a real sidecar (in front of a real Triton) gave."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.hooks.capture import CaptureHook, CaptureRing, capture_hook_from_settings, load_captured
from service.metrics import SidecarMetrics
from service.hooks.base import RequestContext, ScoredRequest


def _disk(directory: Path) -> tuple[int, int]:
    """(records, bytes) actually on disk (committed records: JSON + tensors)."""
    records = list(directory.glob("*.json"))
    size = sum(p.stat().st_size for p in records) + sum(p.stat().st_size for p in directory.glob("*.npz"))
    return len(records), size


def _inputs(seed: int, side: int) -> dict[str, np.ndarray]:
    return {"pixels": np.random.default_rng(seed).random((1, 3, side, side), dtype=np.float32)}


def _scored(request_id: str, flags=(True,), side: int = 8) -> ScoredRequest:
    ctx = RequestContext("m", "1", request_id=request_id)
    return ScoredRequest(ctx, np.array([1.5] * len(flags)), 0.5, "cal-1", np.array(flags), np.array([[0.1, 0.2]]),
                         ("a", "b"), {}, lambda: _inputs(len(request_id), side))


def test_ring_never_exceeds_its_caps_and_evicts_oldest_first(tmp_path):
    ring = CaptureRing(tmp_path, max_items=5, max_bytes=40_000)
    rng = np.random.default_rng(0)
    for i in range(30):
        side = int(rng.integers(4, 40))  # records of very different sizes (incompressible noise)
        entry = ring.add(f"r{i:03d}", {"time": 1000.0 + i, "scores": [1.0], "flags": [True]}, _inputs(i, side))
        count, size = _disk(tmp_path)
        assert count <= 5 and size <= 40_000, f"after record {i}: {count} records, {size} bytes"
        assert count == len(ring) and size == ring.total_bytes
        if entry is not None:
            assert ring.entries()[-1].id == f"r{i:03d}"  # the newest is always kept
    kept = [e.id for e in ring.entries()]
    assert kept == sorted(kept) and kept[-1] == "r029"
    # a record larger than the byte cap alone is refused, and nothing is evicted for it
    before = [e.id for e in ring.entries()]
    assert ring.add("huge", {"time": 2000.0}, _inputs(1, 200)) is None
    assert [e.id for e in ring.entries()] == before and not list(tmp_path.glob("huge*"))


def test_ring_retention_drops_old_records(tmp_path):
    ring = CaptureRing(tmp_path, max_items=100, max_bytes=1 << 24, max_age_s=60.0)
    now = time.time()
    ring.add("old", {"time": now - 3600}, _inputs(0, 4))
    ring.add("new", {"time": now}, _inputs(1, 4))
    assert [e.id for e in ring.entries()] == ["new"] and not (tmp_path / "old.json").exists()


def test_ring_survives_a_restart(tmp_path):
    ring = CaptureRing(tmp_path, max_items=4, max_bytes=1 << 24)
    for i in range(6):
        ring.add(f"id{i}", {"time": 100.0 + i, "scores": [float(i)], "flags": [True]}, _inputs(i, 6))
    # a write interrupted by a crash: tensors without their JSON, and temporary files
    (tmp_path / "crashed.npz").write_bytes(b"partial")
    (tmp_path / ".crashed.json.tmp").write_text("{")
    reopened = CaptureRing(tmp_path, max_items=4, max_bytes=1 << 24)
    assert [e.id for e in reopened.entries()] == ["id2", "id3", "id4", "id5"]
    assert not (tmp_path / "crashed.npz").exists() and not (tmp_path / ".crashed.json.tmp").exists()
    record = reopened.load("id4")
    assert record.scores == [4.0] and np.array_equal(record.inputs["pixels"], _inputs(4, 6)["pixels"])
    # a smaller cap after the restart is applied at once, and later writes keep to it
    smaller = CaptureRing(tmp_path, max_items=2, max_bytes=1 << 24)
    assert [e.id for e in smaller.entries()] == ["id4", "id5"] and _disk(tmp_path)[0] == 2
    smaller.add("id6", {"time": 106.0}, _inputs(6, 6))
    assert [e.id for e in smaller.entries()] == ["id5", "id6"]
    with pytest.raises(KeyError):
        load_captured(tmp_path, "id0")
    with pytest.raises(ValueError):
        load_captured(tmp_path, "../etc/passwd")


def test_hook_keeps_flagged_requests_only(tmp_path):
    metrics = SidecarMetrics()
    hook = CaptureHook(CaptureRing(tmp_path), metrics=metrics)
    assert hook.observe(_scored("clean1", flags=(False,))) == {}
    hook.observe(_scored("flagged1"))
    assert hook.flush()
    assert [e.id for e in hook.ring.entries()] == ["flagged1"]
    meta = load_captured(tmp_path, "flagged1").metadata
    assert meta["flags"] == [True] and meta["scores"] == [1.5] and meta["calibration_id"] == "cal-1"
    assert meta["signals"] == [[0.1, 0.2]] and meta["signal_names"] == ["a", "b"] and meta["model"] == "m"
    assert metrics.registry.get_sample_value("advsentry_capture_written_total") == 1.0
    assert metrics.registry.get_sample_value("advsentry_capture_items") == 1.0


def test_hook_sampling(tmp_path):
    never = CaptureHook(CaptureRing(tmp_path / "never"), sample_rate=0.0)
    some = CaptureHook(CaptureRing(tmp_path / "some"), sample_rate=0.3, seed=1, queue_size=1000)
    for i in range(200):
        never.observe(_scored(f"n{i}"))
        some.observe(_scored(f"s{i}"))
    assert never.flush() and some.flush(30)
    assert len(never.ring) == 0 and 30 <= len(some.ring) <= 90


class _BlockedRing(CaptureRing):
    """A ring whose disk is stuck until released."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.release = threading.Event()

    def add(self, *args, **kwargs):
        self.release.wait(30)
        return super().add(*args, **kwargs)


def test_full_queue_drops_and_counts_and_never_blocks(tmp_path):
    metrics = SidecarMetrics()
    ring = _BlockedRing(tmp_path)
    hook = CaptureHook(ring, queue_size=2, metrics=metrics)
    began = time.perf_counter()
    for i in range(10):
        hook.observe(_scored(f"q{i}"))
    elapsed = time.perf_counter() - began
    # one record in the (stuck) writer, two in the queue, the rest dropped at once
    assert elapsed < 5.0, "observe() must not wait for the disk"
    dropped = metrics.registry.get_sample_value("advsentry_capture_dropped_total", {"reason": "queue_full"})
    assert dropped == hook.dropped and 7 <= dropped <= 8
    ring.release.set()
    assert hook.flush()
    assert len(ring) == 10 - dropped


def test_capture_is_off_by_default_and_built_from_settings(tmp_path):
    from service.hooks.registry import request_hooks
    from service.settings import Settings

    assert not any(isinstance(h, CaptureHook) for h in request_hooks(Settings(), SidecarMetrics()))
    settings = Settings(capture_dir=tmp_path, capture_max_items=3, capture_sample_rate=0.5, capture_queue_size=7)
    hooks = [h for h in request_hooks(settings, SidecarMetrics()) if isinstance(h, CaptureHook)]
    assert len(hooks) == 1 and hooks[0].ring.max_items == 3 and hooks[0].sample_rate == 0.5
    assert capture_hook_from_settings(Settings()) is None


# --- end to end: real Triton, real sidecar, restart, explain ------------------------------------------------


@pytest.mark.slow
def test_explain_reproduces_the_score_of_a_captured_request_after_a_restart(tmp_path, triton):
    import torch
    import tritonclient.grpc as grpcclient
    from typer.testing import CliRunner

    from detector import DEFAULT_COMBINER, DEFAULT_FEATURES, CalibrationArtifact, Detector
    from detector.models import bundled_identity
    from e2e_triton import MODEL, RunningSidecar, fgsm_pixels, infer_input, make_settings, outputs, photo_pixels
    from service.cli import app

    clean = torch.from_numpy(photo_pixels(1))
    adversarial = torch.from_numpy(fgsm_pixels(photo_pixels(1)))
    local = Detector.default(load_model=True).score(torch.cat([clean, adversarial])).tolist()
    assert local[1] > local[0]
    calibration = tmp_path / "calibration.json"
    CalibrationArtifact.create((local[0] + local[1]) / 2, DEFAULT_FEATURES, bundled_identity(),
                               combiner=DEFAULT_COMBINER).save(calibration)
    capture = tmp_path / "capture"

    def start() -> RunningSidecar:
        return RunningSidecar(make_settings(upstream=triton.grpc_address, calibration=calibration,
                                            capture_dir=capture, capture_max_items=5),
                              model_identity={MODEL: bundled_identity()})

    running = start()
    try:
        client = grpcclient.InferenceServerClient(running.address)
        scores = {}
        for name, pixels in (("clean", clean), ("adversarial", adversarial)):
            result = client.infer(MODEL, [infer_input(pixels.numpy())], outputs=outputs("logits"))
            params = result.get_response().parameters
            scores[name] = params["advsentry_score"].double_param if "advsentry_score" in params else None
            flagged = params["advsentry_adversarial"].bool_param
            assert flagged == (name == "adversarial")
    finally:
        running.stop()  # closes the hook: the queued record is written before the sidecar is gone
    records = sorted(capture.glob("*.json"))
    assert len(records) == 1, "only the flagged request is captured"
    record_id = records[0].stem

    running = start()  # a new sidecar on the same directory: the ring is rebuilt from disk
    try:
        hook = next(h for h in running.sidecar.core.hooks if isinstance(h, CaptureHook))
        assert [e.id for e in hook.ring.entries()] == [record_id]
    finally:
        running.stop()

    meta = json.loads(records[0].read_text())
    assert meta["flags"] == [True] and meta["model"] == MODEL and meta["threshold"] == pytest.approx(
        (local[0] + local[1]) / 2)
    if scores["adversarial"] is not None:
        assert meta["scores"][0] == pytest.approx(scores["adversarial"], abs=1e-9)
    out = tmp_path / "explained"
    result = CliRunner().invoke(app, ["explain", "--capture", str(capture), "--id", record_id,
                                      "--calibration", str(calibration), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["captured_score"] == meta["scores"][0]
    assert abs(summary["score_difference"]) < 1e-3, summary  # same pixels, same detector: the sidecar's score
    assert summary["adversarial"] is True and summary["calibration"] == meta["calibration_id"]
    assert record_id in (out / "index.html").read_text()
