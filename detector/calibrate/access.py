"""How a calibration job reaches its models: loading, identity, and the production scoring path.

- :func:`load_model` turns a model spec (``bundled``, a TorchScript file,
  ``package.module:factory`` with optional state-dict weights) into an
  ``nn.Module`` taking ``[0, 1]`` pixels (through the adapter of a declared
  :class:`~detector.contract.InputContract`) plus the :class:`ModelIdentity` the
  artifact records (the weights hash is what the sidecar checks).
- :class:`Scorer` computes logits and the detector's per-map entropies
  exactly as production does: locally through the detector's own feature
  extraction (what the Triton backend runs), or by asking the Triton endpoint
  for the feature-map outputs and computing entropies like the sidecar does.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from detector.contract import InputContract, adapt_model, contract_name
from detector.detector import Detector
from detector.features import extract_maps
from detector.models import ModelIdentity, bundled_identity, file_sha256, load_bundled_model, state_dict_sha256

from .spec import JobConfigError
from .triton_query import TritonEndpoint


def load_model(spec: str, weights: str | None = None, device: str | torch.device = "cpu",
               contract: InputContract | None = None) -> tuple[nn.Module, ModelIdentity]:
    """(module in eval mode, identity) for ``bundled``, a TorchScript file, or ``pkg.module:factory``.

    A declared input ``contract`` (NHWC, 0..255, normalized, FP16) wraps the
    user's module in its adapter and is named in the identity.
    """
    if spec == "bundled":
        if contract is not None and not contract.is_default:
            raise JobConfigError("the bundled model takes advsentry's pixels; an input contract is for your own model")
        return load_bundled_model(device), bundled_identity()
    if ":" in spec and not Path(spec).exists():
        module_name, _, attribute = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise JobConfigError(f"cannot import model factory {spec!r}: {error}") from error
        model = factory()
        if not isinstance(model, nn.Module):
            raise JobConfigError(f"model factory {spec!r} returned {type(model).__name__}, expected torch.nn.Module")
        if weights:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model = model.eval().to(device)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return adapt_model(model, contract), ModelIdentity(contract_name(spec, contract), state_dict_sha256(model))
    path = Path(spec)
    if not path.is_file():
        raise JobConfigError(f"model {spec!r}: not 'bundled', 'triton', an existing TorchScript file or pkg.module:factory")
    try:
        model = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as error:
        raise JobConfigError(f"{path}: not a TorchScript file ({error})") from error
    return adapt_model(model, contract), ModelIdentity(contract_name(path.stem, contract), file_sha256(str(path.resolve())))


class Scorer:
    """Logits and per-map entropies ``[B, F]`` of pixel batches, on the production path."""

    def __init__(self, detector: Detector, *, local: nn.Module | None, endpoint: TritonEndpoint | None) -> None:
        if local is None and endpoint is None:
            raise ValueError("a scorer needs a local model or a Triton endpoint")
        self.detector = detector
        self.local = local
        self.endpoint = endpoint if local is None else None
        if self.endpoint is not None:
            self.endpoint.check_outputs(detector.feature_outputs)
        elif isinstance(local, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
            raise JobConfigError(
                "a TorchScript model can be attacked but its feature maps cannot be computed here (guided "
                "backpropagation needs the eager nn.Module): pass --model pkg.module:factory, or serve the model "
                "on Triton and add --score-via-triton --triton-url ... --triton-model ..."
            )

    @property
    def route(self) -> str:
        return "local" if self.local is not None else self.endpoint.describe()  # type: ignore[union-attr]

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.local is not None:
            with torch.no_grad():
                return self.local(pixels.to(self.detector.device)).detach()
        return self.endpoint.logits(pixels)  # type: ignore[union-attr]

    def maps(self, pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.local is not None:
            return extract_maps(self.local, pixels.to(self.detector.device), self.detector.features)
        outputs = self.endpoint.infer(pixels, ["logits", *self.detector.feature_outputs])  # type: ignore[union-attr]
        logits = outputs.pop("logits")
        return outputs, logits

    def entropies(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.detector.entropies(maps).detach().to("cpu")
