"""KServe-v2 messages as the core sees them: tensor views, request validation, output rewriting.

Pure functions over ``ModelInferRequest``/``ModelInferResponse`` messages
(raw input bytes are viewed, never decoded or re-encoded), shared by the
inference core, the DetectorService and the library interceptor, plus the one
error type that carries a gRPC status out of the core.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from detector.detector import ENTROPY_OUTPUT_PREFIX
from detector.embedding import EMBEDDING_OUTPUT

#: KServe-v2 datatype -> numpy dtype (little-endian, as on the wire). BYTES has no fixed size.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

UpstreamCall = Callable[[object, Sequence[tuple[str, str | bytes]]], Awaitable[object]]


class RequestError(Exception):
    """A request answered with a non-OK gRPC status; ``message`` says what is wrong."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata


@dataclass(frozen=True)
class TensorSpec:
    datatype: str
    shape: tuple[int, ...]  # -1 = any


@dataclass(frozen=True)
class ModelSpec:
    """What validation needs from the model's metadata (shapes include the batch dim if batching)."""

    name: str
    version: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @classmethod
    def from_metadata(cls, metadata) -> "ModelSpec":
        def table(tensors) -> dict[str, TensorSpec]:
            return {t.name: TensorSpec(t.datatype, tuple(int(d) for d in t.shape)) for t in tensors}

        version = metadata.versions[-1] if metadata.versions else ""
        return cls(metadata.name, version, table(metadata.inputs), table(metadata.outputs))


MetadataLookup = Callable[[str, str], Awaitable["ModelSpec | None"]]


def _describe_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _input_array(request, index: int, tensor) -> np.ndarray | None:
    """A read-only view of input ``index``'s values, or ``None`` if not inspectable (shm, BYTES)."""
    if "shared_memory_region" in tensor.parameters:
        return None
    dtype = DTYPES.get(tensor.datatype)
    if dtype is None:
        return None
    if request.raw_input_contents:
        return np.frombuffer(request.raw_input_contents[index], dtype=dtype)
    field_name = _CONTENTS_FIELD.get(tensor.datatype)
    if field_name is None:
        return None
    return np.asarray(getattr(tensor.contents, field_name))


def validate_request(request, spec: ModelSpec | None, *, allow_non_finite: bool = False) -> int:
    """Check a request against its model; returns the batch size (first dim). Raises RequestError.

    NaN/Inf values are refused unless ``allow_non_finite`` (the annotate and
    shadow policies forward them; :func:`non_finite_items` finds them).
    """
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    model = request.model_name
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise RequestError(
            invalid,
            f"model {model!r}: {len(request.inputs)} input(s) declared but {len(request.raw_input_contents)} "
            "raw_input_contents given (they must match one to one)",
        )
    names = [t.name for t in request.inputs]
    if len(set(names)) != len(names):
        raise RequestError(invalid, f"model {model!r}: duplicate input name(s) in {names}")
    if spec is not None:
        missing = sorted(set(spec.inputs) - set(names))
        extra = sorted(set(names) - set(spec.inputs))
        if missing:
            raise RequestError(invalid, f"model {model!r}: missing input(s) {missing}; expected {sorted(spec.inputs)}")
        if extra:
            raise RequestError(invalid, f"model {model!r}: unexpected input(s) {extra}; expected {sorted(spec.inputs)}")
    batch = 1
    for index, tensor in enumerate(request.inputs):
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise RequestError(invalid, f"input {tensor.name!r}: negative dimension in shape {_describe_shape(shape)}")
        if spec is not None:
            expected = spec.inputs[tensor.name]
            if tensor.datatype != expected.datatype:
                raise RequestError(
                    invalid,
                    f"input {tensor.name!r}: datatype {tensor.datatype or '(empty)'} but model {model!r} "
                    f"expects {expected.datatype}",
                )
            if len(shape) != len(expected.shape) or any(
                e >= 0 and e != d for e, d in zip(expected.shape, shape)
            ):
                raise RequestError(
                    invalid,
                    f"input {tensor.name!r}: shape {_describe_shape(shape)} does not match model {model!r} "
                    f"shape {_describe_shape(expected.shape)} (-1 = any)",
                )
        if shape:
            batch = shape[0]
        dtype = DTYPES.get(tensor.datatype)
        if "shared_memory_region" in tensor.parameters:
            continue
        if dtype is not None and request.raw_input_contents:
            expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            actual = len(request.raw_input_contents[index])
            if actual != expected_bytes:
                raise RequestError(
                    invalid,
                    f"input {tensor.name!r}: raw contents are {actual} bytes but shape {_describe_shape(shape)} "
                    f"of {tensor.datatype} needs {expected_bytes} bytes",
                )
        if dtype is not None and dtype.kind == "f" and not allow_non_finite:
            values = _input_array(request, index, tensor)
            # One float64 sum propagates any NaN/Inf and cannot overflow for float16/32 inputs,
            # so the clean case costs one reduction; the exact count (which also rules out a
            # finite FP64 sum that overflowed) is taken only when the sum is not finite.
            if values is not None and values.size and not math.isfinite(values.sum(dtype=np.float64)):
                bad = int(values.size - np.isfinite(values).sum())
                if bad:
                    raise RequestError(
                        invalid, f"input {tensor.name!r}: {bad} value(s) are NaN or infinite; inputs must be finite "
                        "(policy reject refuses them; annotate and shadow forward and flag them)"
                    )
    return batch


def non_finite_items(request, batch: int) -> np.ndarray | None:
    """``[batch]`` booleans: which batch items carry a NaN/Inf input value; None when all are finite.

    Same fast path as :func:`validate_request`: one float64 sum per float
    input, the per-item count only when that sum is not finite.
    """
    items: np.ndarray | None = None
    for index, tensor in enumerate(request.inputs):
        dtype = DTYPES.get(tensor.datatype)
        if dtype is None or dtype.kind != "f":
            continue
        values = _input_array(request, index, tensor)
        if values is None or not values.size or math.isfinite(values.sum(dtype=np.float64)):
            continue
        bad = ~np.isfinite(values)
        if not bad.any():
            continue
        if items is None:
            items = np.zeros(max(batch, 1), dtype=bool)
        if batch > 0 and bad.size % batch == 0:
            items |= bad.reshape(batch, -1).any(axis=1)
        else:  # no batch dimension to split on: the whole request
            items[:] = True
    return items


def output_array(response, name: str) -> np.ndarray:
    """A zero-copy FP32 view of output ``name`` of a response, shaped as declared."""
    for index, tensor in enumerate(response.outputs):
        if tensor.name != name:
            continue
        if tensor.datatype != "FP32":
            raise ValueError(f"feature output {name!r} is {tensor.datatype}, expected FP32")
        shape = tuple(int(d) for d in tensor.shape)
        if index < len(response.raw_output_contents):
            values = np.frombuffer(response.raw_output_contents[index], dtype="<f4")
        else:
            values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        return values.reshape(shape)
    raise KeyError(f"upstream response has no output {name!r}")


def strip_outputs(response, names: set[str]) -> None:
    """Remove outputs (and their raw contents) in place."""
    for index in reversed(range(len(response.outputs))):
        if response.outputs[index].name in names:
            del response.outputs[index]
            if index < len(response.raw_output_contents):
                del response.raw_output_contents[index]


def add_detector_outputs(request, spec: ModelSpec | None, ours: set[str], needed: Sequence[str]) -> set[str]:
    """Ask upstream for ``needed`` (the detector's and hooks' outputs, in place); returns the outputs to strip.

    A request naming no outputs means "all outputs" to Triton. The sidecar
    then names the model's own outputs explicitly, so Triton does not serialize
    detector outputs nobody reads (five maps when the entropies suffice), and
    the client still gets exactly the model's outputs without the detector's.

    ``ours``: every output of the detector in force (its maps, its signals
    output); with the embedding and other calibrations' signals outputs,
    never sent to a client that did not name them.
    """
    ours = {*ours, EMBEDDING_OUTPUT}
    if request.outputs:
        requested = {o.name for o in request.outputs}
        for name in needed:
            if name not in requested:
                request.outputs.add().name = name
        return set(needed) - requested
    if spec is None:  # outputs unknown: Triton sends everything, the detector's are removed
        return ours
    for name in spec.outputs:  # entropy outputs for other calibrations are detector outputs too
        if name not in ours and name not in needed and not name.startswith(ENTROPY_OUTPUT_PREFIX) \
                and name != EMBEDDING_OUTPUT:  # the probing embedding (issue 12) only when asked for
            request.outputs.add().name = name
    for name in needed:
        request.outputs.add().name = name
    return set(needed) & ours  # the model's own outputs (black-box mode reads its logits) stay, as asked for



def set_parameters(message, parameters: dict[str, str | float | bool]) -> None:
    """Write ``parameters`` into a message's ``parameters`` map with the matching InferParameter field."""
    for key, value in parameters.items():
        if isinstance(value, bool):
            message.parameters[key].bool_param = value
        elif isinstance(value, int):
            message.parameters[key].int64_param = value
        elif isinstance(value, float):
            message.parameters[key].double_param = value
        else:
            message.parameters[key].string_param = str(value)


def input_arrays(request) -> dict[str, np.ndarray]:
    """Copies of a request's decodable input tensors, shaped as declared (shm and BYTES inputs skipped)."""
    arrays = {}
    for index, tensor in enumerate(request.inputs):
        values = _input_array(request, index, tensor)
        if values is not None:
            arrays[tensor.name] = np.array(values).reshape([int(d) for d in tensor.shape])
    return arrays
