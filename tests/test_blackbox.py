"""Black-box mode (issue 21): a model advsentry did not export, serving only its logits, is scored by the sidecar.

A real Triton serves a logits-only Python model (the bundled EfficientNet-Lite0
behind a plain ``pixels -> logits`` interface, as an ONNX or TensorRT model
would be); the sidecar, told to protect it with the shipped ``blackbox``
detector, computes that detector's signals from the logits and the request's
pixels and answers with a verdict.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from e2e_triton import RunningSidecar, infer_input, make_settings, outputs, photo_pixels

pytestmark = pytest.mark.slow

NAME = "logits-only"
CONFIG = f"""
name: "{NAME}"
backend: "python"
max_batch_size: 4
input [ {{ name: "pixels" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ 1000 ] }} ]
"""
MODEL_PY = '''
import torch
import triton_python_backend_utils as pb_utils
from detector.models import load_bundled_model


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(1)
        self.model = load_bundled_model()

    def execute(self, requests):
        answers = []
        for request in requests:
            pixels = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "pixels").as_numpy())
            with torch.no_grad():
                logits = self.model(pixels).numpy()
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits)]))
        return answers
'''


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from service.triton.server import TritonServer

    repo = tmp_path_factory.mktemp("repo")
    (repo / NAME / "1").mkdir(parents=True)
    (repo / NAME / "config.pbtxt").write_text(CONFIG)
    (repo / NAME / "1" / "model.py").write_text(textwrap.dedent(MODEL_PY))
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
        assert running.sidecar.protection_modes == {NAME: "blackbox"}
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
