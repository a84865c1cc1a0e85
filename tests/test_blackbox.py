"""Black-box mode (issue 21): a model advsentry did not export, serving only its logits, is scored by the sidecar.

A real Triton serves a logits-only Python model (the bundled EfficientNet-Lite0
behind a plain ``pixels -> logits`` interface, as an ONNX or TensorRT model
would be); the sidecar, told to protect it with the shipped ``blackbox``
detector, computes that detector's signals from the logits and the request's
pixels and answers with a verdict. With Feature Squeezing among its signals
(``blackbox-squeeze``) the squeezed copies go to Triton as extra calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from benchmarks.logits_only import MODEL_PY, write_logits_only_model
from e2e_triton import RunningSidecar, infer_input, make_settings, outputs, photo_pixels

pytestmark = pytest.mark.slow

NAME = "logits-only"
#: The same model, but it fails on any input on the 5-bit grid: a squeezed copy's call fails, the request's does not.
REFUSING = "refuses-squeezed"
REFUSING_PY = MODEL_PY.replace(
    "            pixels = torch.from_numpy(",
    "            values = pb_utils.get_input_tensor_by_name(request, 'pixels').as_numpy()\n"
    "            if abs(values * 31 - (values * 31).round()).max() < 1e-4:\n"
    "                answers.append(pb_utils.InferenceResponse(error=pb_utils.TritonError('no squeezed inputs here')))\n"
    "                continue\n"
    "            pixels = torch.from_numpy(",
)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from service.triton.server import TritonServer

    repo = tmp_path_factory.mktemp("repo")
    write_logits_only_model(repo, NAME)
    write_logits_only_model(repo, REFUSING, model_py=REFUSING_PY)
    server = TritonServer(repo).start()
    yield server
    server.stop()


def test_a_logits_only_model_is_scored_in_black_box_mode(triton):
    from detector import Detector
    from detector.models import load_bundled_model

    detector = Detector.named("blackbox")
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, disclosure="score",
                                           models={NAME: {"calibration": "blackbox"}}))
    try:
        assert running.sidecar.protection_modes == {NAME: "blackbox", REFUSING: "unprotected"}
        client = grpcclient.InferenceServerClient(running.address)
        pixels = photo_pixels(1)
        answer = client.infer(NAME, [infer_input(pixels)])  # no outputs named: the model's own come back
        logits = answer.as_numpy("logits")
        assert logits.shape == (1, 1000) and int(logits.argmax()) == 285  # Egyptian cat, untouched
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in answer.get_response().parameters.items()}
        assert params["advsentry_calibration"] == detector.calibration_id
        # the score is the shipped detector's, computed from these pixels and these logits
        with np.errstate(all="ignore"):
            expected = detector.score_entropies(detector.outside_entropies(pixels, logits))
        assert params["advsentry_score"] == pytest.approx(float(expected[0]), abs=1e-5)
        assert params["advsentry_adversarial"] == bool(expected[0] > detector.threshold)
        # and the same as scoring the image offline through the bundled model
        import torch

        with torch.no_grad():
            offline = load_bundled_model()(torch.from_numpy(pixels)).numpy()
        assert np.allclose(offline, logits, atol=1e-4)
        registry = running.sidecar.metrics.registry
        assert registry.get_sample_value("advsentry_model_protection", {"model": NAME, "mode": "blackbox"}) == 1
    finally:
        running.stop()


def test_black_box_pixels_must_be_one_fp32_image_batch():
    """What black-box mode reads from a request; anything else is a scoring error (counted, never silent)."""
    from tritonclient.grpc import service_pb2

    from service.core.inference import request_pixels

    request = service_pb2.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="pixels", datatype="FP32", shape=[2, 3, 4, 4])
    request.raw_input_contents.append(np.zeros((2, 3, 4, 4), "<f4").tobytes())
    assert request_pixels(request).shape == (2, 3, 4, 4)
    other = service_pb2.ModelInferRequest(model_name=NAME)
    other.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    other.raw_input_contents.append(np.zeros((1, 4), "<f4").tobytes())
    with pytest.raises(ValueError, match=r"exactly one FP32 \[B, 3, H, W\] input"):
        request_pixels(other)


def _inferences(client, model: str) -> int:
    return int(client.get_inference_statistics(model).model_stats[0].inference_count)


def test_feature_squeezing_in_black_box_mode_sends_the_squeezed_copies_upstream(triton):
    import torch

    from detector import Detector

    detector = Detector.named("blackbox-squeeze")
    assert set(detector.outside_transforms()) == {"median2", "bit_depth5"}
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, disclosure="score",
                                           models={NAME: {"calibration": "blackbox-squeeze"}}))
    try:
        assert running.sidecar.protection_modes == {NAME: "blackbox", REFUSING: "unprotected"}
        client = grpcclient.InferenceServerClient(running.address)
        direct = grpcclient.InferenceServerClient(triton.grpc_address)
        pixels = np.concatenate([photo_pixels(1), photo_pixels(3)])
        before = _inferences(direct, NAME)
        answer = client.infer(NAME, [infer_input(pixels)], outputs=outputs("logits"))
        # the request and its two squeezed copies, each a batch of 2
        assert _inferences(direct, NAME) - before == 3 * 2
        assert answer.as_numpy("logits").shape == (2, 1000)
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in answer.get_response().parameters.items()}
        assert params["advsentry_calibration"] == detector.calibration_id
        # the score is what the detector computes with the model itself (squeezed copies through the same weights)
        with torch.no_grad():
            offline = Detector.named("blackbox-squeeze", load_model=True).score(torch.from_numpy(pixels)).numpy()
        served = [float(x) for x in params["advsentry_scores"].split(",")]
        assert np.allclose(served, offline, atol=1e-4) and len(served) == 2
        registry = running.sidecar.metrics.registry
        assert registry.get_sample_value("advsentry_transformed_copies_total", {"model": NAME}) == 2
    finally:
        running.stop()


@pytest.mark.parametrize("policy, scoring_failure", [("reject", None), ("annotate", "open")])
def test_a_failed_squeezed_copy_leaves_the_request_unscored_never_scored_without_it(triton, policy, scoring_failure):
    import grpc

    settings = {"policy": policy, **({"scoring_failure": scoring_failure} if scoring_failure else {})}
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, disclosure="score",
                                           models={REFUSING: {"calibration": "blackbox-squeeze", **settings}}))
    try:
        client = grpcclient.InferenceServerClient(running.address)
        if scoring_failure is None:  # reject: closed, refused
            with pytest.raises(Exception) as refused:
                client.infer(REFUSING, [infer_input(photo_pixels(1))])
            assert "no verdict" in str(refused.value) and "transformed copy" in str(refused.value)
            assert refused.value.status() == f"StatusCode.{grpc.StatusCode.INTERNAL.name}"
        else:  # open: the model's answer, flagged as unscored
            answer = client.infer(REFUSING, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
            params = answer.get_response().parameters
            assert "transformed copy" in params["advsentry_error"].string_param
            assert answer.as_numpy("logits").shape == (1, 1000)
        registry = running.sidecar.metrics.registry
        assert registry.get_sample_value("advsentry_unscored_requests_total",
                                         {"model": REFUSING, "reason": "scoring_error"}) == 1
    finally:
        running.stop()
