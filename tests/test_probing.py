"""Probing detection (issue 12 part 2): the kNN rule, bounded memory, and a real Triton + sidecar.

Unit tests drive :class:`service.hooks.probing.ProbingDetector` directly with a fake
clock. End-to-end tests export the bundled model (which serves
``advsentry_embedding``), start a real Triton and in-process sidecars with the
probing policy on, and act as clients identified by an ``x-client-id`` header.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.hooks.probing import PARAM_PROBING, ProbingDetector, ProbingMetrics, knn_mean_distance


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the rule ------------------------------------------------------------------------------------


def test_knn_mean_distance_matches_a_hand_computation():
    history = np.array([[0, 0], [3, 4], [1, 0], [0, 2]], dtype=np.float32)
    query = np.array([0, 0], dtype=np.float32)
    # distances 0, 5, 1, 2 -> the two nearest are 0 and 1, the three nearest 0, 1, 2
    assert knn_mean_distance(history, query, 2) == pytest.approx(0.5)
    assert knn_mean_distance(history, query, 3) == pytest.approx(1.0)
    assert knn_mean_distance(history, query, 10) == pytest.approx(2.0)  # k > history: all of them
    with pytest.raises(ValueError):
        knn_mean_distance(history[:0], query, 1)


def test_detector_flags_near_duplicates_not_distinct_queries_and_clears_after_detection():
    rng = np.random.default_rng(0)
    detector = ProbingDetector(threshold=0.2, k=3, min_queries=3, history=50, cooldown_s=60, clock=FakeClock())
    distinct = _unit(rng.standard_normal((40, 64)))  # random unit vectors: pairwise ~1.41 apart
    results = detector.observe("clean", distinct)
    assert [r.distance is None for r in results[:4]] == [True, True, True, False]
    assert not any(r.detected or r.flagged for r in results)

    base = rng.standard_normal(64)
    near = _unit(base + 0.01 * rng.standard_normal((10, 64)))
    results = detector.observe("attacker", near)
    first = next(i for i, r in enumerate(results) if r.detected)
    assert first == 3  # the first query with min_queries predecessors
    assert results[first].distance < 0.2 and all(r.flagged for r in results[first:])
    # History is cleared on detection (Chen et al.), keeping only the detecting query: the next
    # detection needs min_queries queries again.
    assert [r.detected for r in results[first + 1:first + 4]] == [False, False, True]
    assert detector.flagged("attacker") and not detector.flagged("clean")


def test_cooldown_ends():
    clock = FakeClock()
    detector = ProbingDetector(threshold=0.5, k=2, min_queries=1, cooldown_s=10, clock=clock)
    same = _unit(np.ones((2, 8)))
    assert detector.observe("a", same)[-1].detected
    clock.now += 9.9
    assert detector.flagged("a")
    clock.now += 0.2
    assert not detector.flagged("a")


def test_history_is_capped_per_client_and_clients_are_evicted_least_recently_seen_first():
    rng = np.random.default_rng(1)
    detector = ProbingDetector(threshold=1e-6, k=2, history=5, max_clients=3, clock=FakeClock())
    rows = _unit(rng.standard_normal((12, 16)))
    detector.observe("a", rows)
    kept = detector.history_of("a")
    assert kept.shape == (5, 16)  # only the last 5 survive the ring
    assert {tuple(r) for r in kept} == {tuple(r) for r in rows[-5:]}

    detector.observe("b", rows[:1])
    detector.observe("c", rows[:1])
    detector.observe("a", rows[:1])  # a is now the most recently seen
    detector.observe("d", rows[:1])  # evicts b, the least recently seen
    assert detector.client_count == 3
    assert detector.clients() == ["c", "a", "d"]
    detector.flagged("c")  # reading does not refresh
    detector.observe("e", rows[:1])
    assert detector.clients() == ["a", "d", "e"]


def test_hook_allow_list_and_shadow_add_no_parameters():
    from service.metrics import SidecarMetrics
    from service.hooks.base import ClientIdentity, RequestContext, ScoredRequest
    from service.hooks.probing import ProbingHook
    from service.settings import ProbingPolicy

    def scored(client: str, embedding: np.ndarray) -> ScoredRequest:
        ctx = RequestContext("m", "1", ClientIdentity(client, "metadata"))
        return ScoredRequest(ctx, np.zeros(1), None, None, np.zeros(1, bool), None, (),
                             {"advsentry_embedding": embedding[None]}, dict)

    same = _unit(np.ones((1, 8)))[0]
    for policy, expected in ((ProbingPolicy.annotate, {PARAM_PROBING: True}), (ProbingPolicy.shadow, {})):
        metrics = SidecarMetrics()
        hook = ProbingHook(ProbingDetector(threshold=0.1, k=2, min_queries=1), policy, metrics, ["metadata:video"])
        for _ in range(3):
            assert hook.observe(scored("metadata:video", same)) == {}
            last = hook.observe(scored("metadata:bot", same))
        assert last == expected
        assert hook.detector.clients() == ["metadata:bot"]  # allow-listed clients are not even tracked
        assert metrics.part(ProbingMetrics).probing_flagged_clients._value.get() >= 1


# --- end to end: real Triton + sidecar -----------------------------------------------------------


def _sidecar(triton, **settings):
    from detector.models import bundled_identity
    from e2e_triton import MODEL, RunningSidecar, make_settings

    return RunningSidecar(make_settings(upstream=triton.grpc_address, client_id_metadata_key="x-client-id",
                                        **settings), model_identity={MODEL: bundled_identity()})


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """10 bundled photos and their mirror images: 20 distinct inputs ``[20, 3, 224, 224]``."""
    from detector.samples import full_photo_samples, to_tensor

    pixels = to_tensor([sample.pixels() for sample in full_photo_samples()]).numpy()
    return np.concatenate([pixels, pixels[:, :, :, ::-1]]).astype(np.float32)


def _near_duplicates(pixels: np.ndarray, count: int, seed: int = 0) -> list[np.ndarray]:
    """Square-attack-like queries: the image plus +-4/255 noise, on the 8-bit grid."""
    rng = np.random.default_rng(seed)
    return [np.clip(np.round((pixels + rng.choice([-4, 4], pixels.shape) / 255) * 255) / 255, 0, 1).astype(np.float32)
            for _ in range(count)]


def _infer(address: str, pixels: np.ndarray, client: str, *names: str):
    import tritonclient.grpc as grpcclient

    from e2e_triton import MODEL, infer_input, outputs

    return grpcclient.InferenceServerClient(address).infer(
        MODEL, [infer_input(pixels[None] if pixels.ndim == 3 else pixels)],
        outputs=outputs(*names) if names else None, headers={"x-client-id": client})


def _probing_param(result) -> bool | None:
    params = result.get_response().parameters
    return params[PARAM_PROBING].bool_param if PARAM_PROBING in params else None


@pytest.mark.slow
def test_triton_embedding_equals_the_local_computation(triton, photos):
    import tritonclient.grpc as grpcclient

    from detector.embedding import EMBEDDING_OUTPUT, embed
    from e2e_triton import MODEL, infer_input, outputs

    direct = grpcclient.InferenceServerClient(triton.grpc_address)
    served = direct.infer(MODEL, [infer_input(photos[:3])], outputs=outputs(EMBEDDING_OUTPUT)).as_numpy(EMBEDDING_OUTPUT)
    assert served.shape == (3, 64)
    np.testing.assert_allclose(served, embed(photos[:3]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_annotate_flags_a_probing_client_but_not_a_clean_one_and_hides_the_embedding(triton, photos):
    from detector.embedding import EMBEDDING_OUTPUT, embed

    running = _sidecar(triton, probing_policy="annotate", probing_min_queries=4, probing_k=4)
    try:
        clean = [_probing_param(_infer(running.address, photo, "clean")) for photo in photos]
        assert clean == [False] * len(photos)

        flags = [_probing_param(_infer(running.address, query, "attacker"))
                 for query in _near_duplicates(photos[1], 6)]
        assert flags[:4] == [False] * 4  # too few previous queries to judge
        assert flags[4:] == [True, True]  # flagged on the first judged query and while in cool-down
        # The clean client is unaffected by the attacker's state.
        assert _probing_param(_infer(running.address, photos[2], "clean")) is False

        # The embedding reaches a client only when asked for by name.
        only_logits = _infer(running.address, photos[0], "other", "logits")
        assert [o.name for o in only_logits.get_response().outputs] == ["logits"]
        everything = _infer(running.address, photos[0], "other")
        assert [o.name for o in everything.get_response().outputs] == ["logits"]
        asked = _infer(running.address, photos[0], "other", "logits", EMBEDDING_OUTPUT)
        assert sorted(o.name for o in asked.get_response().outputs) == sorted(["logits", EMBEDDING_OUTPUT])
        np.testing.assert_allclose(asked.as_numpy(EMBEDDING_OUTPUT), embed(photos[:1]), rtol=1e-5, atol=1e-6)

        metrics = running.sidecar.core.metrics.exposition().decode()
        assert 'advsentry_probing_detections_total{policy="annotate"} 1.0' in metrics
        assert "advsentry_probing_clients 3.0" in metrics
    finally:
        running.stop()


@pytest.mark.slow
def test_reject_refuses_a_flagged_client_during_its_cooldown_then_serves_it_again(triton, photos):
    import time

    import grpc
    from tritonclient.utils import InferenceServerException

    running = _sidecar(triton, probing_policy="reject", probing_min_queries=3, probing_k=3, probing_cooldown_s=3.0)
    try:
        queries = _near_duplicates(photos[3], 4, seed=1)
        for query in queries:  # the detecting (4th) request itself is still served
            assert _infer(running.address, query, "attacker", "logits").as_numpy("logits").shape == (1, 1000)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as refused:
            _infer(running.address, queries[0], "attacker", "logits")
        assert refused.value.status() == str(grpc.StatusCode.PERMISSION_DENIED)
        assert "near-duplicate" in refused.value.message()
        # Other clients are served meanwhile.
        assert _infer(running.address, photos[4], "someone-else", "logits").as_numpy("logits").shape == (1, 1000)
        time.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
        assert _infer(running.address, photos[5], "attacker", "logits").as_numpy("logits").shape == (1, 1000)
    finally:
        running.stop()


def test_shipped_probing_defaults_are_the_ones_the_benchmark_chose_on_dev():
    """The settings' defaults must be what benchmarks/probing.py chose on the corpus dev part and measured."""
    import json
    from pathlib import Path

    from service.settings import Settings

    chosen = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/probing.json").read_text())
    fields = Settings.model_fields
    assert fields["probing_threshold"].default == chosen["threshold"]["chosen"]
    assert fields["probing_k"].default == chosen["threshold"]["k"]
