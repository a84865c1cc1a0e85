"""A Triton endpoint as the model: prediction-only queries (counted) and feature maps, over tritonclient gRPC.

Black box *with probing* means the attacker sees nothing but the served
model's answers. :func:`triton_query_model` wraps an endpoint as a
:class:`~detector.attacks.QueryModel`, so the query-based attacks (boundary,
HopSkipJump, Square, one-pixel) send every probe image as FP32 pixels through
``tritonclient.grpc`` and the attack's query counter counts them.
:class:`TritonEndpoint` additionally counts everything it sends (images and
RPCs, including the attack framework's own uncounted bookkeeping calls), so
the counts can be checked against Triton's own inference statistics.

When the model itself is only reachable through Triton (``--model triton``),
:meth:`TritonEndpoint.infer` also fetches the detector's feature maps, exactly
the outputs the sidecar requests in production.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from detector.attacks import QueryModel

PIXELS_INPUT = "pixels"
LOGITS_OUTPUT = "logits"


class TritonEndpointError(RuntimeError):
    """The endpoint is unreachable, or the model does not have the inputs/outputs needed."""


class TritonEndpoint:
    """One model on one Triton server, called with ``[B, 3, H, W]`` pixel batches."""

    def __init__(self, url: str, model: str, *, input_name: str = PIXELS_INPUT, timeout_s: float = 120.0) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self.url = url
        self.model = model
        self.input_name = input_name
        self.timeout_s = timeout_s
        self.images_sent = 0
        self.requests_sent = 0
        self._client = grpcclient.InferenceServerClient(url)
        try:
            config = self._client.get_model_config(model, as_json=True)["config"]
        except InferenceServerException as error:
            raise TritonEndpointError(f"Triton {url}: cannot read model {model!r}: {error}") from error
        self.max_batch = max(1, int(config.get("max_batch_size", 0) or 1))
        self.outputs = tuple(output["name"] for output in config.get("output", ()))
        inputs = [i["name"] for i in config.get("input", ())]
        if input_name not in inputs:
            raise TritonEndpointError(f"Triton model {model!r} has inputs {inputs}, expected {input_name!r}")
        if LOGITS_OUTPUT not in self.outputs:
            raise TritonEndpointError(f"Triton model {model!r} has outputs {list(self.outputs)}, expected {LOGITS_OUTPUT!r}")

    def describe(self) -> str:
        return f"triton://{self.url}/{self.model}"

    def check_outputs(self, names: Sequence[str]) -> None:
        missing = [name for name in names if name not in self.outputs]
        if missing:
            raise TritonEndpointError(
                f"Triton model {self.model!r} does not return the detector's feature map(s) {missing} "
                f"(it returns {list(self.outputs)}); export it with `advsentry export-model` and the same detector"
            )

    def infer(self, pixels: torch.Tensor, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Requested outputs for a batch, in chunks of the model's ``max_batch_size``."""
        import tritonclient.grpc as grpcclient

        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for start in range(0, array.shape[0], self.max_batch):
            chunk = array[start : start + self.max_batch]
            tensor = grpcclient.InferInput(self.input_name, list(chunk.shape), "FP32")
            tensor.set_data_from_numpy(chunk)
            result = self._client.infer(
                self.model,
                [tensor],
                outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
                client_timeout=self.timeout_s,
            )
            self.requests_sent += 1
            self.images_sent += chunk.shape[0]
            for name in outputs:
                parts[name].append(result.as_numpy(name))
        return {name: torch.from_numpy(np.concatenate(chunks)).to(pixels.device) for name, chunks in parts.items()}

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.infer(pixels, [LOGITS_OUTPUT])[LOGITS_OUTPUT]

    def inference_count(self) -> int:
        """Triton's own count of inferences (images) of this model, for cross-checking query counts."""
        stats = self._client.get_inference_statistics(self.model, as_json=True)
        return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", ()))

    def close(self) -> None:
        self._client.close()


def triton_query_model(endpoint: TritonEndpoint) -> QueryModel:
    """Prediction-only access through ``endpoint``; the attack's ``QueryModel`` counts its queries."""
    return QueryModel(endpoint.logits, max_batch=endpoint.max_batch, description=endpoint.describe())
