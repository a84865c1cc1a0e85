"""Write a standard Triton model repository for a model plus the detector's feature outputs.

The repository is plain Triton: ``<out>/<name>/config.pbtxt`` and
``<out>/<name>/1/model.py`` (Python backend) with ``advsentry_model.json``
beside it. Any Triton 2.x with the Python backend loads it, provided the stub's
interpreter can import torch and advsentry's ``detector`` package.

The model takes ``pixels`` (FP32 ``[B, 3, H, W]`` in ``[0, 1]``) and returns
``logits`` (FP32 ``[B, classes]``), one FP32 output per feature map of the
detector (``feature_response`` by default, ``[B, 3, H, W]``), and
``advsentry_entropy_<hash>`` (FP32 ``[B, F]``): the maps' average local spatial
entropies computed inside Triton (see :func:`detector.entropy_output_name`).
The sidecar asks for the last one when it matches its calibration, so only
``F`` floats per image cross the wire and the proxy runs no tensor code; the
maps stay available for offline tools and for ``--entropy-in sidecar``.
``advsentry_embedding`` (FP32 ``[B, D]``, :mod:`detector.embedding`) is the
per-input embedding the sidecar's probing detection keeps per client. The exporter runs
the model once on a blank image before writing anything, so a model that
guided backpropagation cannot handle is refused at export time, not at the
first request.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detector import ScoreConfig
from detector.contract import InputContract
from detector.embedding import DEFAULT_EMBEDDING, EMBEDDING_OUTPUT, EmbeddingConfig
from detector.models import ModelIdentity
from detector.signals import FeatureConfig

PIXELS_INPUT = "pixels"
LOGITS_OUTPUT = "logits"
BACKEND_MODEL_FILE = Path(__file__).with_name("backend_model.py")


class ExportError(ValueError):
    """The model cannot be exported (and why)."""


@dataclass(frozen=True)
class ModelSource:
    """Where the Triton-side ``model.py`` gets its ``nn.Module`` from.

    kind ``bundled``: the EfficientNet-Lite0 shipped with advsentry.
    kind ``factory``: ``callable`` ("package.module:function") returns the module.
    kind ``state_dict``: as ``factory``, then loads ``weights`` (copied into the repository).
    """

    kind: str = "bundled"
    callable: str | None = None
    weights: Path | None = None
    contract: InputContract | None = None  # what the factory's module takes (the adapter is applied in Triton too)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"kind": self.kind}
        if self.callable:
            document["callable"] = self.callable
        if self.weights is not None:
            document["weights"] = "weights.pt"
        if self.contract is not None and not self.contract.is_default:
            document["contract"] = self.contract.to_dict()
        return document


def model_identity(source: ModelSource, model) -> ModelIdentity:
    """The identity ``advsentry calibrate --model`` gives the same model (name and weights hash), so they match."""
    from detector.models import bundled_identity, state_dict_sha256

    from detector.contract import contract_name, inner_model

    if source.kind == "bundled":
        return bundled_identity()
    return ModelIdentity(contract_name(str(source.callable), source.contract), state_dict_sha256(inner_model(model)))


def repository_identities(repository: str | Path) -> dict[str, ModelIdentity]:
    """``{model name: identity}`` of every advsentry-exported model in a model repository (newest version)."""
    found: dict[str, ModelIdentity] = {}
    for spec_file in sorted(Path(repository).glob("*/*/advsentry_model.json"), key=lambda p: (p.parent.parent.name,
                                                                                                   _version(p))):
        identity = json.loads(spec_file.read_text()).get("model_identity")
        if identity:
            found[spec_file.parent.parent.name] = ModelIdentity(identity["name"], identity["weights_sha256"])
    return found


def _version(spec_file: Path) -> int:
    name = spec_file.parent.name
    return int(name) if name.isdigit() else -1


def _instantiate(source: ModelSource):
    import importlib

    import torch

    if source.kind == "bundled":
        from detector.models import load_bundled_model

        return load_bundled_model("cpu")
    if not source.callable or ":" not in source.callable:
        raise ExportError(f"model factory must look like 'package.module:function', got {source.callable!r}")
    module_name, _, attribute = source.callable.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ExportError(f"cannot import model factory {source.callable!r}: {error}") from error
    model = factory()
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise ExportError(
            "the factory returned a TorchScript module; guided backpropagation intercepts activation "
            "calls in Python, so export the eager nn.Module (TorchScript is accepted only as weights "
            "via --weights with a state dict)"
        )
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model factory returned {type(model).__name__}, expected torch.nn.Module")
    if source.kind == "state_dict":
        if source.weights is None or not Path(source.weights).is_file():
            raise ExportError(f"weights file {source.weights} does not exist")
        state = torch.load(source.weights, map_location="cpu", weights_only=True)
        if isinstance(state, torch.jit.ScriptModule):  # pragma: no cover - defensive
            state = state.state_dict()
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError) as error:
            raise ExportError(f"weights {source.weights} do not fit the model: {error}") from error
    from detector.contract import adapt_model

    return adapt_model(model.eval(), source.contract)


def probe_model(
    model, features: Mapping[str, FeatureConfig], image_size: int
) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Run the feature model once: (number of classes, per-item shape of each map). Raises :class:`ExportError`."""
    import torch

    from detector import UnsupportedModelError
    from detector.features import FeatureModel
    from detector.signals import Signal

    from detector.models import ModelContractError, check_pixel_contract

    try:
        check_pixel_contract(model, image_size)
    except ModelContractError as error:
        raise ExportError(str(error)) from error
    pixels = torch.full((1, 3, image_size, image_size), 0.5)
    try:
        outputs = FeatureModel(model, features)(pixels)
    except (UnsupportedModelError, KeyError, ValueError, RuntimeError) as error:
        raise ExportError(f"the model cannot produce the detector's feature maps: {error}") from error
    logits = outputs[LOGITS_OUTPUT]
    if logits.dim() != 2:
        raise ExportError(f"the model must return logits [B, classes], got shape {tuple(logits.shape)}")
    shapes = {}
    for name, config in features.items():
        expected = (2,) if isinstance(config, Signal) else (3, 4)
        if outputs[name].dim() not in expected:
            what = "[1, 1]" if isinstance(config, Signal) else "[1, C, H, W] or [1, H, W]"
            raise ExportError(f"feature {name!r} has shape {tuple(outputs[name].shape)}, expected {what}")
        shapes[name] = tuple(int(d) for d in outputs[name].shape[1:])
    return int(logits.shape[1]), shapes


def config_pbtxt(
    name: str,
    feature_shapes: Mapping[str, tuple[int, ...]],
    *,
    classes: int,
    image_size: int,
    max_batch_size: int,
    instance_kind: str,
    instances: int,
    max_queue_delay_us: int,
    entropy_output: str | None = None,
    embedding_dim: int | None = None,
) -> str:
    """The model's ``config.pbtxt`` text."""
    outputs = [f'  {{ name: "{LOGITS_OUTPUT}" data_type: TYPE_FP32 dims: [ {classes} ] }}']
    outputs += [
        f'  {{ name: "{out}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, dims))} ] }}'
        for out, dims in feature_shapes.items()
    ]
    if entropy_output:
        outputs.append(f'  {{ name: "{entropy_output}" data_type: TYPE_FP32 dims: [ {len(feature_shapes)} ] }}')
    if embedding_dim:  # probing embedding (issue 12), see detector/embedding.py
        outputs.append(f'  {{ name: "{EMBEDDING_OUTPUT}" data_type: TYPE_FP32 dims: [ {embedding_dim} ] }}')
    kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}[instance_kind]
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {max_batch_size}\n"
        f'input [\n  {{ name: "{PIXELS_INPUT}" data_type: TYPE_FP32 dims: [ 3, {image_size}, {image_size} ] }}\n]\n'
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        f"instance_group [ {{ kind: {kind} count: {instances} }} ]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
        'parameters { key: "advsentry_feature_outputs" value: { string_value: "'
        + ",".join(feature_shapes)
        + '" } }\n'
    )


def export_model_repository(
    out: str | Path,
    *,
    model_name: str = "efficientnet-lite0",
    source: ModelSource | None = None,
    features: Mapping[str, FeatureConfig] | None = None,
    image_size: int = 224,
    max_batch_size: int = 8,
    instance_kind: str = "cpu",
    instances: int = 1,
    max_queue_delay_us: int = 2000,
    embedding: EmbeddingConfig | None = DEFAULT_EMBEDDING,
) -> Path:
    """Write ``<out>/<model_name>/`` and return its path. Existing model directories are replaced."""
    from detector import DEFAULT_FEATURES, entropy_output_name

    source = source or ModelSource()
    features = dict(features or DEFAULT_FEATURES)
    if instance_kind not in ("cpu", "gpu"):
        raise ExportError(f"instance kind must be 'cpu' or 'gpu', got {instance_kind!r}")
    if LOGITS_OUTPUT in features or PIXELS_INPUT in features:
        raise ExportError(f"feature outputs may not be named {LOGITS_OUTPUT!r} or {PIXELS_INPUT!r}")
    # One dry run gives the number of classes and every feature map's shape (guided
    # responses are shaped like the input; activation maps like their layer).
    model = _instantiate(source)
    classes, feature_shapes = probe_model(model, features, image_size)
    identity = model_identity(source, model)
    model_dir = Path(out) / model_name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(
            model_name,
            feature_shapes,
            classes=classes,
            image_size=image_size,
            max_batch_size=max_batch_size,
            instance_kind=instance_kind,
            instances=instances,
            max_queue_delay_us=max_queue_delay_us,
            entropy_output=entropy_output_name(features.values()),
            embedding_dim=embedding.dim if embedding else None,
        )
    )
    shutil.copyfile(BACKEND_MODEL_FILE, version_dir / "model.py")
    if source.weights is not None:
        shutil.copyfile(source.weights, version_dir / "weights.pt")
    spec = {
        "source": source.to_json(),
        "input": PIXELS_INPUT,
        "features": {name: config.to_dict() for name, config in features.items()},
        # JSON objects are unordered (and written sorted): the entropy output's column order is explicit.
        "feature_order": list(features),
        "entropy_output": entropy_output_name(features.values()),
    }
    if embedding:  # the probing embedding output (issue 12)
        spec["embedding"] = embedding.to_dict()
    # what `advsentry serve --model-repository` checks a calibration against (issue 21)
    spec["model_identity"] = identity.to_dict()
    (version_dir / "advsentry_model.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return model_dir
