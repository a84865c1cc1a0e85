"""A Triton model advsentry did not export: the bundled EfficientNet-Lite0 behind a plain ``pixels -> logits``.

What an ONNX or TensorRT classifier already in a user's Triton looks like to
the sidecar (one FP32 ``pixels [B, 3, 224, 224]`` input, one ``logits
[B, 1000]`` output, nothing else), written as a Python-backend model so the
same weights serve it here. Black-box mode's tests and its cost benchmark
serve it from a real ``tritonserver``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
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


def write_logits_only_model(repository: Path, name: str, *, max_batch_size: int = 4, model_py: str = MODEL_PY) -> Path:
    """``repository/name`` with its config and ``1/model.py``; returns the model's directory."""
    directory = Path(repository) / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    (directory / "config.pbtxt").write_text(CONFIG.format(name=name, max_batch_size=max_batch_size))
    (directory / "1" / "model.py").write_text(textwrap.dedent(model_py))
    return directory
