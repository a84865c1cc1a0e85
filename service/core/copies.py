"""Black-box mode's inputs: the request's pixels, and its transformed copies sent upstream as extra calls.

A model advsentry did not export serves only its logits, so a black-box
detector reads the request's pixels (:func:`request_pixels`) and, for
Feature Squeezing, the model's answer on squeezed copies of them. Those
copies (:meth:`detector.Detector.outside_transforms`) travel as one more
ModelInfer call each, the request's own copy with only the pixel input's
values replaced and only ``logits`` asked for, sent *at the same time* as
the request itself, so they add the model's compute, not its latency.

Why copies of the whole request: every other input, the parameters and the
model version stay as the client sent them, so the copy is scored by the
same model under the same conditions. The client never sees a copy's
answer; a copy that fails makes the request unscored (``scoring_error``),
never scored without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import numpy as np
import torch

from .detectors import LOGITS_OUTPUT
from .requests import input_arrays, output_array

Transform = Callable[[torch.Tensor], torch.Tensor]


def pixel_input(request) -> tuple[int, np.ndarray]:
    """The request's one FP32 ``[B, 3, H, W]`` input (pixels in [0, 1]): its index and values; ValueError otherwise."""
    arrays = input_arrays(request)
    images = [(index, arrays[t.name]) for index, t in enumerate(request.inputs)
              if t.name in arrays and arrays[t.name].dtype == np.float32 and arrays[t.name].ndim == 4
              and arrays[t.name].shape[1] == 3]
    if len(images) != 1:
        raise ValueError("black-box mode needs exactly one FP32 [B, 3, H, W] input of pixels in [0, 1], got "
                         f"{[(t.name, t.datatype, list(t.shape)) for t in request.inputs]}")
    return images[0]


def request_pixels(request) -> np.ndarray:
    """Black-box mode: the request's pixels ``[B, 3, H, W]`` (see :func:`pixel_input`)."""
    return pixel_input(request)[1]


def copy_request(request, index: int, pixels: np.ndarray):
    """The request with input ``index``'s values replaced by ``pixels`` and only the logits asked for."""
    copy = type(request)()
    copy.CopyFrom(request)
    data = np.ascontiguousarray(pixels, dtype="<f4")
    if copy.raw_input_contents:
        copy.raw_input_contents[index] = data.tobytes()
    else:
        contents = copy.inputs[index].contents
        del contents.fp32_contents[:]
        contents.fp32_contents.extend(data.ravel().tolist())
    del copy.outputs[:]
    copy.outputs.add().name = LOGITS_OUTPUT
    if copy.id:
        copy.id = f"{copy.id}/advsentry-copy"
    return copy


def transformed_copies(request, transforms: Mapping[str, Transform]) -> dict[str, object]:
    """One request per transform (blocking: the transforms run on the pixels; milliseconds per batch)."""
    index, pixels = pixel_input(request)
    batch = torch.from_numpy(np.array(pixels, dtype=np.float32))
    with torch.no_grad():
        return {key: copy_request(request, index, transform(batch).numpy()) for key, transform in transforms.items()}


async def transformed_logits(request, transforms: Mapping[str, Transform],
                             call: Callable[[object], Awaitable[object]]) -> dict[str, np.ndarray]:
    """The model's logits on each transformed copy of ``request``, by key; the calls run concurrently.

    Raises what building a copy or a call raised; the calls still running are
    cancelled (and awaited) first, so none outlives the request.
    """
    copies = await asyncio.to_thread(transformed_copies, request, transforms)
    tasks = {key: asyncio.ensure_future(call(copy)) for key, copy in copies.items()}
    try:
        responses = {key: await task for key, task in tasks.items()}
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return {key: np.array(output_array(response, LOGITS_OUTPUT)) for key, response in responses.items()}
