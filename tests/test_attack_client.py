"""The attack-as-a-remote-client adapter against a real Triton and a real sidecar (tiny budgets).

One ``tritonserver`` serves the small test CNN (``calibrate_models:target_cnn``,
32x32, the paper's map as its feature): cheap enough that every attack's
every query goes over gRPC in seconds. The sidecar test puts the advsentry
sidecar in front of it, identifying clients by a metadata key and refusing
every request (policy ``reject`` with a threshold below any score), so the
client's records must show the refusal, its status code, and "queries until
detection" = the first call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from e2e_triton import RunningSidecar, export_small_cnn, make_settings, wait_for
from service.hooks.base import RequestHook


class ClientRecorder(RequestHook):
    """A request hook that records who each admitted request came from, as the sidecar resolved it."""

    name = "test_recorder"

    def __init__(self) -> None:
        self.seen: list = []

    async def admit(self, ctx) -> None:
        self.seen.append(ctx.client)


pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
SMALL = "small"


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from service.triton.server import TritonServer

    repo = export_small_cnn(tmp_path_factory.mktemp("repo"), SMALL)
    server = TritonServer(repo, env={"ADVSENTRY_PYTHONPATH": str(TESTS_DIR)})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Three bundled photos at 32x32 on the 8-bit grid (the small CNN's top-1 varies across them)."""
    from detector.samples import full_photo_samples, to_tensor

    photos = to_tensor([s.pixels() for s in full_photo_samples()[:3]])
    small = torch.nn.functional.interpolate(photos, size=32, mode="area")
    return (small * 255).round() / 255


def _local_labels(images: torch.Tensor) -> torch.Tensor:
    from calibrate_models import target_cnn

    with torch.no_grad():
        return target_cnn()(images).argmax(1)


def test_square_client_records_every_call_and_matches_triton_statistics(triton, images):
    from benchmarks.attack_client import AttackClient

    eps = 8 / 255
    with AttackClient(triton.grpc_address, SMALL, client_id="attacker-1") as client:
        before = client.endpoint.inference_count()
        run = client.run("square", images, params={"eps": eps, "n_queries": 40}, seed=3)
        sent = client.endpoint.images_sent
        assert wait_for(lambda: client.endpoint.inference_count() - before >= sent, timeout=10)
        counted = client.endpoint.inference_count() - before
    # every image the client sent is one Triton inference, and the records account for all of them
    assert sent == counted == run.images_sent == sum(r.images for r in run.records) > 0
    assert [r.call for r in run.records] == list(range(len(run.records)))
    assert all(r.ok and r.status == "OK" and not r.detected for r in run.records)
    assert run.queries_until_detection() is None  # plain Triton: no refusals, no probing flag
    images_of_calls = [r.image for r in run.records]
    assert images_of_calls == sorted(images_of_calls) and set(images_of_calls) == {0, 1, 2}  # one input after another
    # labels are the served model's own predictions of the clean images (the first call of each input)
    assert [o.label for o in run.outcomes] == _local_labels(images).tolist()
    assert any(o.success for o in run.outcomes)
    for outcome in run.outcomes:
        assert outcome.attempted and outcome.sent == sum(r.images for r in run.records if r.image == outcome.image)
        assert outcome.adversarial.dtype == np.uint8 and outcome.adversarial.shape == (3, 32, 32)
        delta = np.abs(outcome.adversarial.astype(int) - np.round(images[outcome.image].numpy() * 255).astype(int))
        assert delta.max() <= 8  # L∞ budget on the 8-bit grid
        first = run.queries_until_success(outcome.image)
        if outcome.success:
            assert outcome.label_after != outcome.label and first is not None and 1 <= first <= outcome.sent
            assert outcome.queries is not None and outcome.queries <= 40
        # the run-level count starts at the run's first call: never below the per-input count
    assert run.queries_until_success() is not None and run.queries_until_success() >= 1
    document = json.loads(json.dumps(run.to_dict()))
    assert document["summary"]["images_sent"] == sent and document["client_id"] == "attacker-1"
    assert len(document["records"]) == len(run.records)


def test_square_client_is_reproducible_by_seed(triton, images):
    from benchmarks.attack_client import AttackClient

    with AttackClient(triton.grpc_address, SMALL) as client:
        runs = [client.run("square", images[:1], params={"eps": 4 / 255, "n_queries": 15}, seed=7) for _ in range(2)]
    assert np.array_equal(runs[0].outcomes[0].adversarial, runs[1].outcomes[0].adversarial)
    assert [r.images for r in runs[0].records] == [r.images for r in runs[1].records]


@pytest.mark.parametrize("attack, params", [
    ("hopskipjump", {"max_iter": 1, "max_eval": 10, "init_eval": 4, "init_size": 10, "batch_size": 16}),
    ("boundary", {"max_iter": 2, "num_trial": 2, "sample_size": 2, "init_size": 10, "batch_size": 16}),
    ("one_pixel", {"popsize": 10, "max_iter": 1}),
])
def test_decision_and_pixel_attacks_run_as_a_client(triton, images, attack, params):
    from benchmarks.attack_client import AttackClient

    with AttackClient(triton.grpc_address, SMALL, client_id="attacker-2") as client:
        run = client.run(attack, images[:1], params=params)
        assert client.endpoint.images_sent == run.images_sent
    outcome = run.outcomes[0]
    assert outcome.attempted and outcome.sent == run.images_sent > 1
    # RPCs never exceed the model's max_batch_size (8): the attack's batches are split per call
    assert max(r.images for r in run.records) <= 8
    if attack != "one_pixel" and outcome.success:
        # decision attacks start from an adversarial point: the server already answered "fooled" once
        assert run.queries_until_success(0) is not None
    if attack == "one_pixel":
        assert outcome.adversarial is not None and (outcome.adversarial != np.round(images[0].numpy() * 255)).any(0).sum() <= 1


def test_unknown_attack_is_refused_before_any_call(triton, images):
    from benchmarks.attack_client import AttackClient

    with AttackClient(triton.grpc_address, SMALL) as client:
        with pytest.raises(ValueError, match="unknown client attack"):
            client.run("fgsm", images[:1])
        assert client.endpoint.images_sent == 0


def test_client_id_metadata_reaches_the_sidecar_and_refusals_stop_the_client(triton, images, tmp_path):
    """Behind the sidecar (policy reject, threshold below any score): refused at the first call, identified by metadata."""
    from benchmarks.attack_client import AttackClient
    from detector import FEATURE_RESPONSE, PAPER_CONFIG, CalibrationArtifact
    from detector.models import ModelIdentity
    from service.settings import ModelProtection

    artifact = tmp_path / "small.json"
    CalibrationArtifact.create(-1e9, {FEATURE_RESPONSE: PAPER_CONFIG}, ModelIdentity("small-cnn", "0" * 64)).save(artifact)
    settings = make_settings(upstream=triton.grpc_address, client_id_metadata_key="x-client-id",
                             models={SMALL: ModelProtection(calibration=artifact, policy="reject")})
    running = RunningSidecar(settings)
    recorder = ClientRecorder()
    seen = recorder.seen
    running.sidecar.core.hooks.append(recorder)
    try:
        with AttackClient(running.address, SMALL, client_id="attacker-9", headers={"x-extra": "1"}) as client:
            run = client.run("square", images, params={"eps": 8 / 255, "n_queries": 10})
        with AttackClient(running.address, SMALL, client_id="attacker-10", stop_on_refusal=False) as client:
            keep_going = client.run("square", images[:2], params={"eps": 8 / 255, "n_queries": 10})
    finally:
        running.stop()
    first = run.records[0]
    assert not first.ok and first.status == "PERMISSION_DENIED" and first.detected
    assert len(run.records) == 1 and run.queries_until_detection() == 1 and run.queries_until_success() is None
    assert run.outcomes[0].stopped == "refused: PERMISSION_DENIED" and not run.outcomes[0].success
    assert [o.stopped for o in run.outcomes[1:]] == ["client stopped", "client stopped"]
    assert seen[0].key == "metadata:attacker-9" and seen[0].source == "metadata"
    # without stop_on_refusal the client moves on to the next input (one refused call each)
    assert [r.status for r in keep_going.records] == ["PERMISSION_DENIED", "PERMISSION_DENIED"]
    assert [r.image for r in keep_going.records] == [0, 1] and seen[-1].key == "metadata:attacker-10"


def test_probing_flag_in_response_parameters_counts_as_detection():
    """``queries_until_detection`` reads the response parameter a probing detector sets (no server needed)."""
    from benchmarks.attack_client import ClientRun, QueryRecord, truthy

    def record(call: int, parameters: dict) -> QueryRecord:
        return QueryRecord(call, 0, 4, 4 * call, "OK", "", parameters, fooled=int(call == 3), fooled_in_budget=int(call == 3), seconds=0.0)

    run = ClientRun("square", {}, "c", "e", 0, None,
                    records=[record(0, {}), record(1, {"advsentry_probing": False}), record(2, {"advsentry_probing": True}),
                             record(3, {"advsentry_probing": True})])
    assert run.queries_until_detection() == 12 and run.queries_until_success() == 16
    assert run.summary()["flagged_calls"] == 2 and run.summary()["refused_calls"] == 0
    assert [truthy(v) for v in (True, 1, 0.5, "yes", "false", "0", "", 0, None)] == [True, True, True, True, False, False, False, False, False]


def test_mutual_tls_client_is_identified_by_its_certificate(triton, images, tmp_path):
    """TlsConfig: the client connects to a sidecar that requires client certificates; the sidecar sees its subject."""
    from benchmarks.attack_client import AttackClient
    from detector import FEATURE_RESPONSE, PAPER_CONFIG, CalibrationArtifact
    from detector.calibrate.triton_query import TlsConfig
    from detector.models import ModelIdentity
    from service.settings import ModelProtection
    from test_tls import Pki  # the TLS tests' throwaway CAs and certificates

    pki = Pki(tmp_path)
    artifact = tmp_path / "small.json"
    CalibrationArtifact.create(-1e9, {FEATURE_RESPONSE: PAPER_CONFIG}, ModelIdentity("small-cnn", "0" * 64)).save(artifact)
    settings = make_settings(upstream=triton.grpc_address, disclosure="score",
                             tls_cert_file=pki.path("server"), tls_key_file=pki.path("server-key"),
                             tls_client_ca_file=pki.path("client-ca"), tls_require_client_cert=True,
                             models={SMALL: ModelProtection(calibration=artifact, policy="annotate")})
    running = RunningSidecar(settings)
    recorder = ClientRecorder()
    seen = recorder.seen
    running.sidecar.core.hooks.append(recorder)
    try:
        tls = TlsConfig(pki.path("server-ca"), pki.path("client-key"), pki.path("client"))
        with AttackClient(running.address, SMALL, tls=tls) as client:
            run = client.run("square", images[:1], params={"eps": 8 / 255, "n_queries": 3})
    finally:
        running.stop()
    assert run.records and all(r.ok for r in run.records)
    assert seen and seen[0].source == "mtls" and "client-1" in seen[0].key
    # the sidecar's annotations come back as response parameters of every call (threshold below any score)
    assert all(r.parameters.get("advsentry_adversarial") is True for r in run.records)
