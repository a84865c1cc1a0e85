"""Which detector scores which model, and calibration hot reload.

A protected model gets a :class:`ModelDetector`: the ``detector.Detector`` that
scores its maps, the mapping from the model's Triton output names to the
detector's map names, and where its calibration came from. Calibration files
are polled (mtime, size, content hash); a changed file is loaded into a *new*
detector that replaces the old one atomically only if it loads and matches the
detector's score configuration; a bad file is refused with a log line and the
``advsentry_calibration_reloads_total{result="refused"}`` metric, and the old
calibration stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector import GENERIC_FEATURES, CalibrationError, Detector, ModelIdentity, entropy_output_name

from .metrics import SidecarMetrics

LOGGER = logging.getLogger(__name__)
_GENERIC_ENTROPY_OUTPUT = entropy_output_name(GENERIC_FEATURES.values())


@dataclass(frozen=True)
class ModelDetector:
    """The detector of one protected model plus how its Triton outputs map onto the detector's maps."""

    model: str
    detector: Detector
    output_to_map: Mapping[str, str]  # Triton output name -> detector map name
    calibration_source: str | None

    @property
    def feature_outputs(self) -> tuple[str, ...]:
        return tuple(self.output_to_map)

    @property
    def threshold(self) -> float | None:
        return self.detector.threshold

    @property
    def calibration_id(self) -> str | None:
        return self.detector.calibration_id

    def score(self, maps: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores ``[N]`` for maps keyed by Triton output name (runs the detector; blocking)."""
        import torch

        tensors = {
            self.output_to_map[name]: torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
            for name, array in maps.items()
        }
        with torch.no_grad():
            entropies = self.detector.entropies(tensors)
        # Combined exactly as when Triton computed the entropies, so both paths give the same score.
        return self.detector.score_entropies(entropies.to("cpu").numpy())

    @property
    def entropy_output(self) -> str:
        """The model output that carries this detector's entropies when Triton computes them."""
        return self.detector.entropy_output

    def score_entropies(self, entropies: np.ndarray) -> np.ndarray:
        """Scores ``[N]`` from the model's entropy output ``[N, F]`` (microseconds; runs inline)."""
        if entropies.ndim != 2 or entropies.shape[1] != len(self.output_to_map):
            raise ValueError(
                f"entropy output {self.entropy_output!r} has shape {list(entropies.shape)}, "
                f"expected [batch, {len(self.output_to_map)}]"
            )
        return self.detector.score_entropies(entropies)

    def verdicts(self, scores: np.ndarray) -> np.ndarray | None:
        """``True`` = adversarial; ``None`` when no threshold is in force."""
        if self.threshold is None:
            return None
        return scores > self.threshold


def _file_signature(path: Path) -> tuple[int, int, str] | None:
    try:
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, digest


class DetectorRegistry:
    """Builds and holds the detector of each protected model; reloads changed calibration files."""

    def __init__(
        self,
        *,
        default_calibration: Path | None,
        per_model_calibration: Mapping[str, Path] | None = None,
        per_model_outputs: Mapping[str, tuple[str, ...]] | None = None,
        model_identity: Mapping[str, ModelIdentity] | None = None,
        device: str = "cpu",
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self.default_calibration = Path(default_calibration) if default_calibration else None
        self.per_model_calibration = {k: Path(v) for k, v in (per_model_calibration or {}).items()}
        self.per_model_outputs = dict(per_model_outputs or {})
        self.model_identity = dict(model_identity or {})
        self.device = device
        self.metrics = metrics
        self._lock = threading.Lock()
        self._detectors: dict[str, ModelDetector] = {}
        self._signatures: dict[Path, tuple[int, int, str] | None] = {}
        # Models served by the model-agnostic detector (they expose the generic map,
        # not the default's): never given the default calibration, which is for other maps.
        self._generic: set[str] = set()
        # The default detector (no model-specific file): validated once at start.
        self._template = self._build(None, self.default_calibration)
        if self.default_calibration:
            self._signatures[self.default_calibration] = _file_signature(self.default_calibration)
        for model, path in self.per_model_calibration.items():
            self._signatures[path] = _file_signature(path)
            self.get(model)  # fail fast on a bad per-model artifact

    def _calibration_path(self, model: str | None) -> Path | None:
        if model is not None and model in self.per_model_calibration:
            return self.per_model_calibration[model]
        if model in self._generic:
            return None
        return self.default_calibration

    def _build(self, model: str | None, path: Path | None) -> Detector:
        identity = self.model_identity.get(model) if model else None
        if path is None:
            return Detector(GENERIC_FEATURES if model in self._generic else None, device=self.device)
        return Detector.from_artifact(path, model_identity=identity, device=self.device)

    def default_feature_outputs(self) -> tuple[str, ...]:
        return self._template.feature_outputs

    def default_entropy_output(self) -> str:
        return self._template.entropy_output

    @staticmethod
    def generic_feature_outputs() -> tuple[str, ...]:
        return tuple(GENERIC_FEATURES)

    @staticmethod
    def generic_entropy_output() -> str:
        return _GENERIC_ENTROPY_OUTPUT

    def get(self, model: str, *, generic: bool = False) -> ModelDetector:
        """The model's detector (built on first use). Raises ``CalibrationError`` for a bad artifact.

        ``generic``: the model exposes only the model-agnostic map (see :data:`GENERIC_FEATURES`).
        """
        with self._lock:
            if generic and model not in self.per_model_calibration:
                self._generic.add(model)
            found = self._detectors.get(model)
        if found is not None:
            return found
        path = self._calibration_path(model)
        built = self._wrap(model, self._build(model, path), path)
        with self._lock:
            self._detectors.setdefault(model, built)
            found = self._detectors[model]
        self._publish(found)
        return found

    def _wrap(self, model: str, detector: Detector, path: Path | None) -> ModelDetector:
        outputs = self.per_model_outputs.get(model) or detector.feature_outputs
        if len(outputs) != len(detector.feature_outputs):
            raise CalibrationError(
                f"model {model!r} is configured with feature outputs {list(outputs)} but the detector "
                f"reads {len(detector.feature_outputs)} map(s) {list(detector.feature_outputs)}"
            )
        return ModelDetector(model, detector, dict(zip(outputs, detector.feature_outputs)), str(path) if path else None)

    def _publish(self, model_detector: ModelDetector) -> None:
        if self.metrics is not None:
            self.metrics.set_calibration(
                model_detector.model,
                "",
                model_detector.calibration_id,
                model_detector.calibration_source or "none",
                model_detector.threshold,
                created_at=model_detector.detector.calibration.created_at if model_detector.detector.calibration else None,
            )

    def known(self) -> list[ModelDetector]:
        with self._lock:
            return list(self._detectors.values())

    def check_reload(self) -> list[str]:
        """Reload changed calibration files now; returns what happened (for logs and tests)."""
        events: list[str] = []
        for path, old in list(self._signatures.items()):
            new = _file_signature(path)
            if new == old:
                continue
            self._signatures[path] = new
            try:
                template = self._build(None, path)
                with self._lock:
                    models = [m for m in self._detectors if self._calibration_path(m) == path]
                rebuilt = {m: self._wrap(m, self._build(m, path), path) for m in models}
            except (CalibrationError, ValueError, OSError) as error:
                LOGGER.error("calibration %s refused, keeping the one in force: %s", path, error)
                if self.metrics is not None:
                    self.metrics.calibration_reloads.labels("refused").inc()
                events.append(f"refused {path}: {error}")
                continue
            with self._lock:
                if path == self.default_calibration:
                    self._template = template
                self._detectors.update(rebuilt)
            for model_detector in rebuilt.values():
                self._publish(model_detector)
            if self.metrics is not None:
                self.metrics.calibration_reloads.labels("loaded").inc()
            LOGGER.info("calibration %s reloaded (id %s, threshold %s)", path, template.calibration_id, template.threshold)
            events.append(f"loaded {path}: {template.calibration_id}")
        return events

    async def watch(self, interval_s: float) -> None:
        """Poll the calibration files forever (run as a task)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.check_reload)
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                LOGGER.exception("calibration watcher error")

    def score(self, key: tuple, maps: Mapping[str, np.ndarray]) -> np.ndarray:
        """Batcher entry point: ``key[0]`` is the model name."""
        return self.get(key[0]).score(maps)
