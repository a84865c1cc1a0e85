"""Prediction-only access to a classifier (``QueryModel``) and adapters for the libraries.

Query-based (black-box probing) attacks must never touch weights or gradients:
they are meant to be pointed at the served model, e.g. a remote Triton
endpoint. They therefore see the model only through ``QueryModel.predict``,
a swappable ``images -> logits`` callable that also counts queries. The
adapters below present that callable in the shapes torchattacks (an
``nn.Module``) and ART (a black-box estimator over numpy arrays) expect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

PredictFn = Callable[[Tensor], Tensor]


class QueryModel:
    """``predict(images [B,3,H,W] in [0,1]) -> logits [B,K]``, counting every image sent.

    ``queries`` counts images (one batched call of 64 images is 64 queries), the
    unit black-box attack papers report. Calls split into chunks of
    ``max_batch`` images so a remote endpoint never sees oversized requests.
    """

    def __init__(self, predict: PredictFn, *, max_batch: int = 256, description: str = "predict callable"):
        self._predict = predict
        self.max_batch = max_batch
        self.description = description
        self.queries = 0

    @classmethod
    def from_module(cls, module: nn.Module, *, max_batch: int = 256) -> QueryModel:
        """Query access to a local ``nn.Module`` (forward under ``no_grad``)."""
        return cls(module, max_batch=max_batch, description=type(module).__name__)

    def __call__(self, images: Tensor) -> Tensor:
        return self.predict(images)

    def predict(self, images: Tensor, *, count: bool = True) -> Tensor:
        """Logits on ``images.device``; ``count=False`` for bookkeeping evaluations."""
        outputs = []
        with torch.no_grad():
            for chunk in images.detach().split(self.max_batch):
                outputs.append(torch.as_tensor(self._predict(chunk)).to(images.device, torch.float32))
        if count:
            self.queries += images.shape[0]
        return torch.cat(outputs)

    def __repr__(self) -> str:
        return f"QueryModel({self.description}, queries={self.queries})"


def as_query_model(model: nn.Module | QueryModel | PredictFn) -> QueryModel:
    """Normalize whatever an attack was given into a :class:`QueryModel`."""
    if isinstance(model, QueryModel):
        return model
    if isinstance(model, nn.Module):
        return QueryModel.from_module(model)
    if callable(model):
        return QueryModel(model)
    raise TypeError(f"expected an nn.Module, a QueryModel or a predict callable, got {type(model).__name__}")


class QueryModule(nn.Module):
    """``nn.Module`` face of a :class:`QueryModel`, for torchattacks' score-based attacks.

    torchattacks reads the device off ``model.parameters()``, so the module
    carries one empty parameter on the attack's device. No gradient can flow
    through it: predictions run under ``no_grad``.
    """

    def __init__(self, query: QueryModel, device: torch.device):
        super().__init__()
        self.query = query
        self.anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.query(images)


def art_blackbox(query: QueryModel, input_shape: tuple[int, ...], nb_classes: int, device: torch.device) -> Any:
    """An ART black-box estimator whose every prediction goes through ``query``."""
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        return query(images).cpu().numpy()

    return BlackBoxClassifierNeuralNetwork(
        predict_fn, input_shape=tuple(input_shape), nb_classes=nb_classes, channels_first=True, clip_values=(0.0, 1.0)
    )


def art_pytorch(module: nn.Module, input_shape: tuple[int, ...], nb_classes: int, device: torch.device) -> Any:
    """An ART white-box estimator (gradients) around a pixel-space ``nn.Module``."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=module,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=nb_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )
