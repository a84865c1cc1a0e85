"""Triton Python-backend model that serves logits and the detector's feature responses.

This file is copied verbatim as ``<repository>/<model>/1/model.py`` by
``advsentry export-model``. It reads ``advsentry_model.json`` next to it:

- ``source``: ``{"kind": "bundled"}`` (EfficientNet-Lite0 shipped with
  advsentry), ``{"kind": "factory", "callable": "pkg.module:function"}`` (a
  function returning an eager ``nn.Module`` that takes ``[B, 3, H, W]`` pixels in
  ``[0, 1]``) or ``{"kind": "state_dict", ...}`` (factory + weights file);
  with ``"contract"`` (detector/contract.py) when the module takes NHWC,
  0..255, normalized or FP16 input: it is wrapped in the same adapter as
  in ``advsentry calibrate``, so the served ``pixels`` stay advsentry's;
- ``features``: ``{output name: ScoreConfig dict}``, the maps the detector reads;
- ``feature_order``: their order (the columns of the entropy output);
- ``entropy_output``: that output's name, checked against the features' hash;
- ``input``: the name of the pixel input;
- ``embedding`` (optional): the probing embedding's config; when present the
  model also serves ``advsentry_embedding`` ``[B, D]`` (``detector/embedding.py``).

Besides the maps it serves ``advsentry_entropy_<hash>`` (``[B, F]``): the
maps' average local spatial entropies, computed here with the same
``detector.map_entropies`` the sidecar uses, so the sidecar in front only
combines ``F`` floats per image and runs no tensor code per request.

Why the feature responses are computed here and not in the sidecar: guided
backpropagation needs the model's forward and backward pass, which already
happens where the model lives, so the sidecar never needs the model weights.
The entropies are computed here too since that removed all tensor work from
the proxy's request path (``benchmarks/notes.md``: 1.6–3.0× the requests/s of
shipping the maps). Maps and entropies are only computed when a request asks
for them (a direct client that asks for ``logits`` only pays for one forward
pass under ``no_grad``).

Why the ``ADVSENTRY_PYTHONPATH`` handling: the Python-backend stub ignores
``PYTHONPATH``; Triton setups that do not install advsentry into the stub's
interpreter can point this variable at the directories that hold the
``detector`` package.
"""

import json
import os
import sys
from pathlib import Path

for _entry in reversed(os.environ.get("ADVSENTRY_PYTHONPATH", "").split(os.pathsep)):
    if _entry and _entry not in sys.path:
        sys.path.insert(0, _entry)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _load_module(source, device):
    import importlib

    import torch

    kind = source.get("kind")
    if kind == "bundled":
        from detector.models import load_bundled_model

        return load_bundled_model(device)
    if kind in ("factory", "state_dict"):
        module_name, _, attribute = source["callable"].partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
        model = factory()
        if kind == "state_dict":
            weights = Path(__file__).with_name(source["weights"])
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model = model.eval().to(device)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        from detector.contract import InputContract, adapt_model

        return adapt_model(model, InputContract.from_dict(source.get("contract"))).to(device)
    raise ValueError(f"advsentry_model.json: unknown source kind {kind!r}")


class TritonPythonModel:
    """Batched ``pixels -> logits (+ feature maps)``; Triton's dynamic batcher fills the batch."""

    def initialize(self, args):
        import torch

        from detector import entropy_output_name
        from detector.signals import feature_from_dict
        from detector.features import FeatureModel

        spec = json.loads(Path(__file__).with_name("advsentry_model.json").read_text())
        use_gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args.get('model_instance_device_id', 0)}" if use_gpu else "cpu")
        self.input_name = spec["input"]
        order = spec.get("feature_order") or list(spec["features"])
        self.features = {name: feature_from_dict(spec["features"][name]) for name in order}
        self.model = _load_module(spec["source"], self.device)
        self.feature_model = FeatureModel(self.model, self.features)
        self.entropy_output = entropy_output_name(self.features.values())
        if spec.get("entropy_output", self.entropy_output) != self.entropy_output:
            raise ValueError(
                f"advsentry_model.json declares entropy output {spec['entropy_output']!r} but its features "
                f"hash to {self.entropy_output!r} (edited by hand, or another advsentry version wrote it)"
            )
        self.all_outputs = ["logits", *self.features, self.entropy_output]
        # Probing embedding (issue 12): input-space, needs no forward pass (detector/embedding.py).
        self.embedder = None
        if spec.get("embedding"):
            from detector.embedding import EMBEDDING_OUTPUT, Embedder, EmbeddingConfig

            self.embedding_output = EMBEDDING_OUTPUT
            self.embedder = Embedder(EmbeddingConfig.from_dict(spec["embedding"]), channels=3)
            self.all_outputs.append(EMBEDDING_OUTPUT)

    def execute(self, requests):
        import torch

        from detector import map_entropies

        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        wanted = set()
        for request in requests:
            names = request.requested_output_names()
            wanted.update(names if names else self.all_outputs)
        pixels = torch.from_numpy(np.concatenate(arrays).astype(np.float32, copy=False)).to(self.device)
        if any(name in self.features or name == self.entropy_output for name in wanted):
            # Guided backprop needs autograd: no torch.no_grad() here.
            outputs = self.feature_model(pixels)
            if self.entropy_output in wanted:
                with torch.no_grad():
                    outputs[self.entropy_output] = map_entropies(outputs, self.features)
        else:
            with torch.no_grad():
                outputs = {"logits": self.model(pixels)}
        if self.embedder is not None and self.embedding_output in wanted:
            outputs[self.embedding_output] = self.embedder(pixels)
        outputs = {k: v.detach().to("cpu").float().numpy() for k, v in outputs.items() if k in wanted}
        responses = []
        start = 0
        for request, size in zip(requests, sizes):
            names = request.requested_output_names() or self.all_outputs
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(outputs[name][start : start + size]))
                for name in names
                if name in outputs
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
