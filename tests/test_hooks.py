"""Request hooks and client identity: what a hook sees, what it may refuse, and that it cannot break a request.

Unit tests for :func:`service.clients.resolve_client`; end-to-end tests run
hooks inside a real sidecar in front of a real Triton serving the bundled model.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from e2e_triton import MODEL, RunningSidecar, infer_input, make_settings, outputs, photo_pixels
from service.clients import peer_host, resolve_client
from service.core.requests import RequestError
from service.hooks.base import RequestHook

# --- client identity ---------------------------------------------------------------------------


def test_mtls_subject_wins_over_metadata_and_peer():
    settings = make_settings(client_id_metadata_key="x-client-id")
    client = resolve_client(settings, peer="ipv4:10.0.0.7:5000",
                            auth_context={"x509_common_name": [b"ops"], "transport_security_type": [b"ssl"]},
                            metadata=[("x-client-id", "alice")])
    assert (client.key, client.source) == ("mtls:ops", "mtls")


def test_metadata_key_is_used_only_when_configured():
    meta = [("X-Client-Id", "alice")]
    configured = resolve_client(make_settings(client_id_metadata_key="x-client-id"), peer="ipv4:10.0.0.7:5000",
                                auth_context={}, metadata=meta)
    assert (configured.key, configured.source) == ("metadata:alice", "metadata")
    default = resolve_client(make_settings(), peer="ipv4:10.0.0.7:5000", auth_context={}, metadata=meta)
    assert (default.key, default.source) == ("peer:ipv4:10.0.0.7", "peer")


@pytest.mark.parametrize("peer, host", [
    ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
    ("ipv6:[::1]:5", "ipv6:[::1]"),
    ("unix:/tmp/sock", "unix:/tmp/sock"),
    ("", None),
])
def test_peer_host_drops_the_port(peer, host):
    assert peer_host(peer) == host


# --- hooks in a real sidecar -------------------------------------------------------------------


class Recording(RequestHook):
    name = "recording"

    def __init__(self, extra: str) -> None:
        self.extra, self.seen, self.admitted, self.released = extra, [], 0, 0

    def extra_outputs(self, model):
        return (self.extra,)

    async def admit(self, ctx):
        self.admitted += 1

    def observe(self, scored):
        self.seen.append(scored)
        return {}

    def release(self, ctx):
        self.released += 1


class Failing(RequestHook):
    name = "failing"

    def observe(self, scored):
        raise RuntimeError("boom")


class Refusing(RequestHook):
    name = "refusing"

    async def admit(self, ctx):
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"refused for {ctx.client.key}")


@pytest.fixture(scope="module")
def running(triton):
    from detector.models import bundled_identity

    sidecar = RunningSidecar(make_settings(upstream=triton.grpc_address), model_identity={MODEL: bundled_identity()})
    yield sidecar
    sidecar.stop()


def test_hook_sees_signals_inputs_client_and_its_extra_output_which_the_client_never_gets(running):
    core = running.sidecar.core
    detector = running.sidecar.registry.get(MODEL, generic=False)
    extra = detector.feature_outputs[0]  # a feature map: served by the model, unused on the entropy path
    hook = Recording(extra)
    core.hooks[:] = [hook]
    try:
        pixels = photo_pixels(1)
        result = grpcclient.InferenceServerClient(running.address).infer(
            MODEL, [infer_input(pixels)], outputs=outputs("logits"))
    finally:
        core.hooks[:] = []
    assert [o.name for o in result.get_response().outputs] == ["logits"]
    (scored,) = hook.seen
    assert hook.admitted == hook.released == 1
    assert scored.context.model == MODEL and scored.context.client.key.startswith("peer:ipv")
    assert len(scored.context.request_id) == 32
    assert scored.signals.shape == (1, len(scored.signal_names))
    np.testing.assert_allclose(detector.score_entropies(scored.signals), scored.scores)
    assert scored.extra_outputs[extra].shape[0] == 1 and scored.extra_outputs[extra].ndim >= 2
    np.testing.assert_array_equal(scored.inputs()["pixels"], pixels)


def test_a_failing_hook_is_counted_and_the_request_still_served(running):
    core = running.sidecar.core
    before = running.sidecar.metrics.hook_errors.labels("failing")._value.get()
    core.hooks[:] = [Failing()]
    try:
        result = grpcclient.InferenceServerClient(running.address).infer(
            MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
    finally:
        core.hooks[:] = []
    assert int(result.as_numpy("logits").argmax()) == 285
    assert running.sidecar.metrics.hook_errors.labels("failing")._value.get() == before + 1


def test_a_refusing_hook_answers_its_status_and_earlier_hooks_are_released(running):
    core = running.sidecar.core
    first = Recording("logits")
    core.hooks[:] = [first, Refusing()]
    try:
        with pytest.raises(InferenceServerException) as raised:
            grpcclient.InferenceServerClient(running.address).infer(
                MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
    finally:
        core.hooks[:] = []
    assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "refused for peer:" in raised.value.message()
    assert first.admitted == first.released == 1 and first.seen == []
