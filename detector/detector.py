"""``Detector``: images or feature maps in, scores and verdicts out.

A detector is a set of named feature maps (each with its :class:`ScoreConfig`),
a combiner from their entropies to one score, and a threshold. The single map
plus threshold of the paper is the special case. The sidecar never runs the
model itself: an exported Triton model returns the per-map entropies (computed
there by :func:`map_entropies`) and the sidecar calls
:meth:`Detector.score_entropies`, or it returns the maps and the sidecar calls
:meth:`Detector.score_maps`; offline tools with a local model call
:meth:`Detector.score`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .calibration import CalibrationArtifact, CalibrationError
from .combiner import Combiner, SingleMap
from .config import PAPER_CONFIG, ScoreConfig
from .entropy import average_local_spatial_entropy
from .features import FeatureModel, extract_maps
from .models import ModelIdentity, bundled_identity, load_bundled_model
from .signals import FeatureConfig, Signal, SignalContext

#: The Triton output name of the single-map detector.
FEATURE_RESPONSE = "feature_response"

#: The product default: the detector the detection study chose on its development
#: part, shipped as a calibration artifact for the bundled EfficientNet-Lite0
#: (maps, combiner, and a threshold at 5% FPR on the study's dev clean images).
#: ``benchmarks/detection_study`` writes it; see its README for why this one.
DEFAULT_ARTIFACT_PATH = Path(__file__).resolve().parent / "data" / "default_detector.json"
DEFAULT_ARTIFACT = CalibrationArtifact.load(DEFAULT_ARTIFACT_PATH)
DEFAULT_FEATURES: dict[str, ScoreConfig] = dict(DEFAULT_ARTIFACT.features)
DEFAULT_COMBINER: Combiner = DEFAULT_ARTIFACT.combiner

#: The model-agnostic detector for any other model: the paper's map (guided
#: backprop of the auto-detected final conv layer). The default above reads
#: named layers of EfficientNet-Lite0, so it cannot serve a user's own model;
#: users calibrate their own (``advsentry calibrate``) starting from this one.
GENERIC_FEATURES: dict[str, ScoreConfig] = {FEATURE_RESPONSE: PAPER_CONFIG}


#: Detectors shipped by name: the product default; the first study's five
#: entropies (9 photos, the default before the corpus study); the corpus
#: study's choice before the learned signals; and ``paper`` (below), the
#: paper's single map, which has no artifact because it has no shipped
#: threshold (calibrate it).
NAMED_ARTIFACTS: dict[str, Path] = {
    "default": DEFAULT_ARTIFACT_PATH,
    "entropy-9photo": DEFAULT_ARTIFACT_PATH.with_name("entropy_9photo_detector.json"),
    # the corpus study's choice before the learned signals: squeezers, logit, residual and spectral statistics
    # (nothing fitted inside a signal, so it carries over to new content more easily; test AUC 0.71-0.98)
    "fixed-signals": DEFAULT_ARTIFACT_PATH.with_name("fixed_signals_detector.json"),
    # black-box mode (issue 21): signals the sidecar computes from a model's logits and its request's pixels,
    # for models advsentry did not export (see computable_outside)
    "blackbox": DEFAULT_ARTIFACT_PATH.with_name("blackbox_detector.json"),
    # ... plus Feature Squeezing, whose two squeezed copies the sidecar sends upstream beside each request
    "blackbox-squeeze": DEFAULT_ARTIFACT_PATH.with_name("blackbox_squeeze_detector.json"),
}
#: Signal kinds computable outside the model: from its logits and the input pixels alone (no layer), and
#: Feature Squeezing, whose squeezed copies the sidecar sends upstream as extra calls (``Signal.transforms``).
OUTSIDE_KINDS = frozenset({"logit_margin", "softmax_entropy", "residual_entropy", "spectral_hf", "squeeze_l1"})


def computable_outside(features: Mapping[str, FeatureConfig]) -> bool:
    """Whether every feature can be computed by the sidecar from a model's logits and the request's pixels.

    Such a detector protects a model advsentry did not export (an ONNX or
    TensorRT model that serves only its logits): black-box mode. Feature maps
    (guided responses, activations) and layer-reading signals need the model
    itself; Feature Squeezing needs its answers on squeezed copies, which
    the sidecar gets by one more upstream call per copy.
    """
    return bool(features) and all(isinstance(c, Signal) and c.kind in OUTSIDE_KINDS and not c.layers()
                                  for c in features.values())
PAPER = "paper"
#: Every shipped detector's name, as every entry point accepts it.
SHIPPED_DETECTORS: tuple[str, ...] = (*NAMED_ARTIFACTS, PAPER)


@dataclass(frozen=True)
class DetectorSpec:
    """What a detector name or artifact file resolves to: signals, combiner and (when calibrated) the artifact."""

    name: str  # the shipped name, or the artifact's path as given
    features: dict[str, FeatureConfig]
    combiner: Combiner
    artifact: CalibrationArtifact | None  # None: uncalibrated (``paper``), no threshold
    path: Path | None  # the artifact's file (what hot reload watches); None for ``paper``


def _shipped_name(spec: str | Path) -> str | None:
    """``spec`` as a shipped name, or None. An existing file of that name wins (it is what the user pointed at)."""
    text = str(spec)
    if text in SHIPPED_DETECTORS and not Path(text).is_file():
        return text
    return None


def artifact_location(spec: str | Path) -> Path:
    """Where ``spec``'s artifact lives: a shipped name's file, else the path itself (``paper`` stays ``paper``).

    Cheap (no file is read): settings validation uses it, so a shipped name
    in a flag, an environment variable or a YAML file means the same file.
    """
    name = _shipped_name(spec)
    return NAMED_ARTIFACTS[name] if name in NAMED_ARTIFACTS else Path(spec)


def resolve_detector(spec: str | Path) -> DetectorSpec:
    """The one resolver of detector names for every entry point (serve, score, explain, export-model, calibrate).

    A shipped name (:data:`SHIPPED_DETECTORS`) or an artifact file. Raises
    :class:`CalibrationError` for a missing or invalid file, naming the
    shipped detectors, so every command fails the same way.
    """
    name = _shipped_name(spec)
    if name == PAPER:
        return DetectorSpec(PAPER, dict(GENERIC_FEATURES), SingleMap(), None, None)
    path = artifact_location(spec)
    if name is None and not path.is_file():
        raise CalibrationError(f"{spec}: no such file, and not a shipped detector ({', '.join(SHIPPED_DETECTORS)})")
    artifact = CalibrationArtifact.load(path)
    return DetectorSpec(name or str(spec), dict(artifact.features), artifact.combiner, artifact, path)


def resolve_artifact(spec: str | Path) -> Path:
    """A shipped detector's artifact file, or an artifact path (kept for callers that only need the file)."""
    return artifact_location(spec)


def exceeds(scores: np.ndarray | torch.Tensor, threshold: float | None) -> np.ndarray | torch.Tensor:
    """The one threshold comparison: ``True`` (adversarial) where a score is *above* the threshold.

    Every verdict (sidecar, DetectorService, CLI, calibration) goes through
    here, so a score equal to the threshold is clean everywhere. With no
    threshold nothing is flagged.
    """
    if threshold is None:
        return torch.zeros_like(scores, dtype=torch.bool) if isinstance(scores, torch.Tensor) else \
            np.zeros(np.shape(scores), dtype=bool)
    return scores > threshold


#: Prefix of the Triton output that carries per-map entropies computed inside Triton.
ENTROPY_OUTPUT_PREFIX = "advsentry_entropy_"


def entropy_output_name(configs: Iterable[FeatureConfig]) -> str:
    """The Triton output name of the per-map entropies ``[B, F]`` for these map configs, in this order.

    Why a hash in the name: a model exported for one set of maps must never be
    combined with a calibration fitted on another. The sidecar uses the model's
    entropies only when the name it derives from its calibration is among the
    model's outputs; any difference (a layer, a gray-scale mode, the order)
    changes the name and the sidecar falls back to fetching the maps.
    """
    document = json.dumps([config.to_dict() for config in configs], sort_keys=True, separators=(",", ":"))
    return ENTROPY_OUTPUT_PREFIX + hashlib.sha256(document.encode()).hexdigest()[:16]


def map_entropies(maps: Mapping[str, torch.Tensor], features: Mapping[str, FeatureConfig],
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Per-feature values ``[B, F]`` in ``features`` order: a map's average local spatial entropy, or a signal.

    Shared by :meth:`Detector.entropies` (sidecar, offline tools) and the
    exported Triton model, so both compute exactly the same numbers. (The
    name predates the other signals; a signal's output is already its value.)
    """
    missing = [name for name in features if name not in maps]
    if missing:
        raise KeyError(f"missing feature map(s): {', '.join(missing)}")
    columns = []
    for name, config in features.items():
        output = maps[name] if device is None else maps[name].to(device)
        if isinstance(config, Signal):
            columns.append(config.reduce(output))
        else:
            columns.append(average_local_spatial_entropy(output, config))
    return torch.stack(columns, dim=1)


class Detector:
    """Scores inputs by the average local spatial entropy of their feature maps."""

    def __init__(
        self,
        features: Mapping[str, FeatureConfig] | ScoreConfig | None = None,
        *,
        combiner: Combiner | None = None,
        threshold: float | None = None,
        model: nn.Module | None = None,
        model_identity: ModelIdentity | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if features is None:
            features = DEFAULT_FEATURES
            combiner = combiner or DEFAULT_COMBINER
        elif isinstance(features, ScoreConfig):
            features = {FEATURE_RESPONSE: features}
        if not features:
            raise ValueError("a detector needs at least one feature map")
        self.features: dict[str, FeatureConfig] = dict(features)
        self.combiner: Combiner = combiner or SingleMap()
        if isinstance(self.combiner, SingleMap) and len(self.features) != 1:
            raise ValueError("several feature maps need a fitted combiner (e.g. LogisticCombiner)")
        self.threshold = threshold
        self.device = torch.device(device)
        self.model = model.to(self.device) if model is not None else None
        self.model_identity = model_identity
        self.calibration: CalibrationArtifact | None = None
        # Read on every request by the sidecar: hashed once here (the maps never change after init).
        self._entropy_output = entropy_output_name(self.features.values())

    @classmethod
    def default(cls, device: str | torch.device = "cpu", *, load_model: bool = False) -> "Detector":
        """The product default on the bundled EfficientNet-Lite0, with its shipped threshold.

        The model is loaded on demand (or now, with ``load_model``).
        """
        model = load_bundled_model(device) if load_model else None
        detector = cls(model=model, model_identity=bundled_identity(), device=device)
        detector.apply_calibration(DEFAULT_ARTIFACT, source=str(DEFAULT_ARTIFACT_PATH))
        return detector

    @classmethod
    def named(cls, name: str, device: str | torch.device = "cpu", *, load_model: bool = False) -> "Detector":
        """A shipped detector on the bundled model: ``default``, ``fixed-signals``, ``entropy-9photo`` or ``paper`` (no threshold)."""
        if name not in SHIPPED_DETECTORS:
            raise KeyError(f"unknown detector {name!r}; shipped: {', '.join(SHIPPED_DETECTORS)}")
        model = load_bundled_model(device) if load_model else None
        return cls.from_spec(name, model=model, model_identity=bundled_identity(), device=device)

    @classmethod
    def from_spec(
        cls,
        spec: "str | Path | DetectorSpec",
        *,
        model: nn.Module | None = None,
        model_identity: ModelIdentity | None = None,
        device: str | torch.device = "cpu",
    ) -> "Detector":
        """A detector from a shipped name or an artifact file (see :func:`resolve_detector`).

        With ``model_identity`` given, an artifact fitted on other weights is refused.
        """
        resolved = spec if isinstance(spec, DetectorSpec) else resolve_detector(spec)
        detector = cls(resolved.features, combiner=resolved.combiner, model=model, model_identity=model_identity,
                       device=device)
        if resolved.artifact is not None:
            detector.apply_calibration(resolved.artifact, source=resolved.name)
        return detector

    @classmethod
    def from_artifact(
        cls,
        path: str | Path,
        *,
        model: nn.Module | None = None,
        model_identity: ModelIdentity | None = None,
        device: str | torch.device = "cpu",
    ) -> "Detector":
        """A detector configured *by* an artifact (its maps, combiner and threshold).

        With ``model_identity`` given, an artifact fitted on other weights is refused.
        """
        artifact = CalibrationArtifact.load(path)
        detector = cls(
            artifact.features,
            combiner=artifact.combiner,
            model=model,
            model_identity=model_identity,
            device=device,
        )
        detector.apply_calibration(artifact)
        return detector

    @property
    def feature_outputs(self) -> tuple[str, ...]:
        return tuple(self.features)

    @property
    def calibration_id(self) -> str | None:
        return self.calibration.id if self.calibration else None

    def load_calibration(self, path: str | Path) -> CalibrationArtifact:
        """Load and apply an artifact; refuses one fitted for another score or model."""
        artifact = CalibrationArtifact.load(path)
        self.apply_calibration(artifact, source=str(path))
        return artifact

    def apply_calibration(self, artifact: CalibrationArtifact, *, source: str = "artifact") -> None:
        problems = artifact.mismatches(self.features, self.model_identity)
        if problems:
            raise CalibrationError(f"{source} does not match this detector: " + "; ".join(problems))
        self.combiner = artifact.combiner
        self.threshold = artifact.threshold
        self.calibration = artifact

    def _model(self) -> nn.Module:
        if self.model is None:
            if self.model_identity is not None and self.model_identity == bundled_identity():
                self.model = load_bundled_model(self.device)
            else:
                raise RuntimeError("this detector has no model; use score_maps() with precomputed maps")
        return self.model

    def feature_model(self, model: nn.Module | None = None) -> FeatureModel:
        """``pixels -> {"logits", **maps}``: what a Triton-hosted model must return."""
        return FeatureModel(model if model is not None else self._model(), self.features)

    def entropies(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-map average local spatial entropy, ``[B, F]`` in ``feature_outputs`` order."""
        return map_entropies(maps, self.features, self.device)

    @property
    def entropy_output(self) -> str:
        """The Triton output a model exported for this detector's maps computes the entropies in."""
        return self._entropy_output

    def score_entropies(self, entropies: np.ndarray) -> np.ndarray:
        """Scores ``[B]`` (float64) from per-map entropies ``[B, F]`` computed elsewhere (inside Triton)."""
        return self.combiner.combine_array(np.asarray(entropies))

    def outside_transforms(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Black-box mode: the transformed copies whose logits the signals need (one upstream call each), by key."""
        transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for config in self.features.values():
            if isinstance(config, Signal):
                transforms.update(config.transforms())
        return transforms

    def outside_entropies(self, pixels: np.ndarray, logits: np.ndarray,
                          transformed: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """``[B, F]`` signal values from the request's pixels ``[B, 3, H, W]`` and the model's logits (black-box mode).

        ``transformed``: the model's logits on each of :meth:`outside_transforms`'
        copies, by key (what the sidecar's extra upstream calls returned).
        """
        if not computable_outside(self.features):
            raise ValueError("this detector reads the model's internals; black-box mode needs one that does not")
        transformed = dict(transformed or {})
        missing = sorted(set(self.outside_transforms()) - set(transformed))
        if missing:
            raise ValueError(f"black-box mode: no logits for the transformed copies {missing}")
        def as_tensor(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.array(array, dtype=np.float32), device=self.device)

        context = SignalContext(None, as_tensor(pixels), as_tensor(logits))  # type: ignore[arg-type]
        context.with_transformed({key: as_tensor(values) for key, values in transformed.items()})
        columns = [Signal.reduce(config.compute(context)) for config in self.features.values()]  # type: ignore[union-attr]
        return torch.stack(columns, dim=1).double().cpu().numpy()

    def score_maps(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``[B]`` from precomputed feature maps (the sidecar's path)."""
        return self.combiner.combine(self.entropies(maps))

    def maps_and_logits(self, pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This detector's feature maps of a batch of pixels, and the logits of the same forward pass."""
        return extract_maps(self._model(), pixels.to(self.device), self.features)

    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` for a batch of ``[0, 1]`` RGB pixels ``[B, 3, H, W]``."""
        maps, _ = self.maps_and_logits(pixels)
        return self.score_maps(maps)

    def verdict(self, scores: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """``True`` where a score is above the threshold (adversarial)."""
        threshold = self.threshold if threshold is None else threshold
        if threshold is None:
            raise CalibrationError("no threshold: load a calibration artifact or pass threshold=")
        return exceeds(scores, threshold)
