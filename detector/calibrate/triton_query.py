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

The endpoint is also the remote-client adapter of the attack-as-a-client
benchmark (``benchmarks/attack_client.py``): any KServe-v2 server (Triton, or
the advsentry sidecar in front of it), per-call gRPC metadata (``headers``,
e.g. a client-id key the sidecar identifies clients by), optional TLS
(:class:`TlsConfig`, mutual when a key and chain are given), and one
:class:`CallRecord` per RPC (status code, the response's parameters such as
``advsentry_probing``, predicted labels) handed to ``on_call``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.attacks import QueryModel

PIXELS_INPUT = "pixels"
LOGITS_OUTPUT = "logits"


class TritonEndpointError(RuntimeError):
    """The endpoint is unreachable, or the model does not have the inputs/outputs needed."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the endpoint: PEM file paths (tritonclient reads them). Key + chain make it mutual TLS."""

    root_certificates: str | Path | None = None
    private_key: str | Path | None = None
    certificate_chain: str | Path | None = None

    def client_kwargs(self) -> dict[str, Any]:
        def path(value: str | Path | None) -> str | None:
            return None if value is None else str(value)

        return {"ssl": True, "root_certificates": path(self.root_certificates),
                "private_key": path(self.private_key), "certificate_chain": path(self.certificate_chain)}


@dataclass(frozen=True)
class CallRecord:
    """One ModelInfer RPC as the client saw it.

    ``status``: ``"OK"`` or the gRPC status code's name (``PERMISSION_DENIED``,
    ``RESOURCE_EXHAUSTED``, ...); ``parameters``: the response's parameters
    (``advsentry_score``, ``advsentry_probing``, ...) as plain Python values;
    ``predictions``: top-1 class per image when logits were requested.
    """

    index: int
    images: int
    status: str
    message: str = ""
    parameters: dict[str, bool | int | float | str] = field(default_factory=dict)
    predictions: tuple[int, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "OK"


class TritonCallError(TritonEndpointError):
    """A ModelInfer call failed or was refused; ``record`` says how (status code, message)."""

    def __init__(self, record: CallRecord) -> None:
        super().__init__(f"ModelInfer refused: {record.status}: {record.message}")
        self.record = record


def _status_name(error: Any) -> str:
    """``StatusCode.PERMISSION_DENIED`` (tritonclient's text) -> ``PERMISSION_DENIED``."""
    status = error.status() if hasattr(error, "status") else None
    return str(status).rpartition(".")[2] if status else "UNKNOWN"


def response_parameters(result: Any) -> dict[str, bool | int | float | str]:
    """The KServe-v2 response parameters of a tritonclient gRPC result, as plain values."""
    values: dict[str, bool | int | float | str] = {}
    for key, parameter in result.get_response().parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        if which is not None:
            values[key] = getattr(parameter, which)
    return values


class TritonEndpoint:
    """One model on one KServe-v2 server (Triton or the sidecar), called with ``[B, 3, H, W]`` pixel batches.

    ``headers``: gRPC metadata sent with every call (keys lower-case), e.g.
    ``{"x-client-id": "attacker-1"}``; ``tls``: connect over TLS;
    ``on_call``: called with a :class:`CallRecord` after every ModelInfer RPC,
    failed ones included (those then raise :class:`TritonCallError`).
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        input_name: str = PIXELS_INPUT,
        timeout_s: float = 120.0,
        headers: Mapping[str, str] | None = None,
        tls: TlsConfig | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
    ) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self.url = url
        self.model = model
        self.input_name = input_name
        self.timeout_s = timeout_s
        self.headers = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        self.on_call = on_call
        self.images_sent = 0
        self.requests_sent = 0
        self._client = grpcclient.InferenceServerClient(url, **(tls.client_kwargs() if tls else {}))
        try:
            config = self._client.get_model_config(model, as_json=True, headers=self.headers or None)["config"]
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
        return f"kserve-v2 grpc://{self.url}/{self.model}"

    def check_outputs(self, names: Sequence[str]) -> None:
        missing = [name for name in names if name not in self.outputs]
        if missing:
            raise TritonEndpointError(
                f"Triton model {self.model!r} does not return the detector's feature map(s) {missing} "
                f"(it returns {list(self.outputs)}); export it with `advsentry export-model` and the same detector"
            )

    def infer(self, pixels: torch.Tensor, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Requested outputs for a batch, in chunks of the model's ``max_batch_size``.

        Raises :class:`TritonCallError` when a call fails or is refused (after
        ``on_call`` has seen its record); the chunks before it were sent and counted.
        """
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for start in range(0, array.shape[0], self.max_batch):
            chunk = array[start : start + self.max_batch]
            tensor = grpcclient.InferInput(self.input_name, list(chunk.shape), "FP32")
            tensor.set_data_from_numpy(chunk)
            began = time.perf_counter()
            try:
                result = self._client.infer(
                    self.model,
                    [tensor],
                    outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
                    client_timeout=self.timeout_s,
                    headers=self.headers or None,
                )
            except InferenceServerException as error:
                record = CallRecord(self.requests_sent, chunk.shape[0], _status_name(error), str(error.message()),
                                    seconds=time.perf_counter() - began)
                self.requests_sent += 1
                self.images_sent += chunk.shape[0]
                if self.on_call is not None:
                    self.on_call(record)
                raise TritonCallError(record) from error
            self.requests_sent += 1
            self.images_sent += chunk.shape[0]
            for name in outputs:
                parts[name].append(result.as_numpy(name))
            if self.on_call is not None:
                predictions = tuple(int(i) for i in parts[LOGITS_OUTPUT][-1].argmax(1)) if LOGITS_OUTPUT in parts else ()
                self.on_call(CallRecord(self.requests_sent - 1, chunk.shape[0], "OK", "", response_parameters(result),
                                        predictions, time.perf_counter() - began))
        return {name: torch.from_numpy(np.concatenate(chunks)).to(pixels.device) for name, chunks in parts.items()}

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.infer(pixels, [LOGITS_OUTPUT])[LOGITS_OUTPUT]

    def inference_count(self) -> int:
        """Triton's own count of inferences (images) of this model, for cross-checking query counts."""
        stats = self._client.get_inference_statistics(self.model, as_json=True, headers=self.headers or None)
        return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", ()))

    def close(self) -> None:
        self._client.close()


def triton_query_model(endpoint: TritonEndpoint) -> QueryModel:
    """Prediction-only access through ``endpoint``; the attack's ``QueryModel`` counts its queries."""
    return QueryModel(endpoint.logits, max_batch=endpoint.max_batch, description=endpoint.describe())
