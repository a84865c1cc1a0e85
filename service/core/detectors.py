"""Which detector scores which model, how the model serves it, and calibration hot reload (fail closed).

A protected model gets a :class:`ModelDetector`: the ``detector.Detector`` that
scores it, the mapping from the model's Triton output names to the detector's
map names, and where its calibration came from. It is an immutable *snapshot*:
a request looks it up once and carries it through upstream, scoring and the
verdict, and the micro-batcher only batches requests holding the same
snapshot, so a reload between two steps can never score a batch with one
detector and threshold it with another.

How a model serves its detector (:meth:`ModelDetector.serving`): the per-signal
floats that ``advsentry export-model`` models compute inside Triton (one small
output), or the feature maps for the sidecar to score. A model whose outputs
give neither cannot be scored by that detector.

Hot reload: calibration files are polled (mtime, size, content hash). A
changed file is loaded into *new* snapshots that replace the old ones only if
every model bound to the file can use them: the artifact loads and is intact,
it was fitted for the model's weights (when the sidecar knows them), and the
model's outputs (as last read from its metadata) serve the new detector. Any
failure refuses the whole file: the old calibration keeps serving (models
first seen later get it too, not the refused file), an ERROR line says why, and ``advsentry_calibration_reload_failures_total{model,
reason}`` counts it (reasons in :data:`RELOAD_FAILURE_REASONS`). Why all or
nothing: one file is one calibration id in force, never a mix across models.
A refused file is tried again when it changes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector import GENERIC_FEATURES, CalibrationError, Detector, ModelIdentity, entropy_output_name
from detector.detector import ENTROPY_OUTPUT_PREFIX, DetectorSpec, computable_outside, resolve_detector

from ..metrics import SidecarMetrics

LOGGER = logging.getLogger(__name__)
_GENERIC_ENTROPY_OUTPUT = entropy_output_name(GENERIC_FEATURES.values())

#: Why a reload was refused: the file is not a valid artifact (unreadable, malformed, tampered with);
#: it was fitted for other model weights; the served model's outputs do not serve its signals or maps.
RELOAD_FAILURE_REASONS = ("invalid_artifact", "model_mismatch", "outputs_missing")
#: Label of a refusal that concerns every (future) model of a calibration file, when no model is bound yet.
ALL_MODELS = "*"
#: Black-box mode: the model output holding the logits, and the key the request's pixels travel under to the batcher.
LOGITS_OUTPUT = "logits"
BLACKBOX_PIXELS = "advsentry:pixels"
#: ... and the keys the logits of its transformed copies (Feature Squeezing's) travel under, plus the copy's key.
TRANSFORMED_PREFIX = "advsentry:copy:"


class ReloadRefused(Exception):
    """A calibration reload that would leave a model unable to be scored; ``reason`` is a metric label."""

    def __init__(self, model: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.model = model
        self.reason = reason


@dataclass(frozen=True)
class Serving:
    """How a model delivers its detector's input: ``signals`` (Triton computed them) or ``maps`` (scored here)."""

    kind: str  # "signals" | "maps" | "blackbox" (signals computed here from the logits and the request's pixels)
    outputs: tuple[str, ...]  # the Triton outputs to request

    @property
    def signals(self) -> str | None:
        """The entropy (signals) output, when Triton computes the signals."""
        return self.outputs[0] if self.kind == "signals" else None


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a snapshot, usable in a batch key
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

    @property
    def entropy_output(self) -> str:
        """The model output that carries this detector's entropies when Triton computes them."""
        return self.detector.entropy_output

    def serving(self, outputs: Iterable[str] | None, *, prefer_signals: bool = True) -> Serving | None:
        """How a model with ``outputs`` serves this detector; None when it cannot.

        ``outputs`` unknown (no metadata): the maps are asked for, and a model
        without them fails upstream with Triton's own status. The signals
        output is used only under the name derived from this detector's
        signal configs, so a model exported for other signals never feeds
        this combiner (``prefer_signals=False``: maps whenever the model has them).
        """
        if outputs is None:
            return Serving("maps", self.feature_outputs)
        available = set(outputs)
        has_maps = set(self.feature_outputs) <= available
        if self.entropy_output in available and (prefer_signals or not has_maps):
            return Serving("signals", (self.entropy_output,))
        if has_maps:
            return Serving("maps", self.feature_outputs)
        if self.blackbox and LOGITS_OUTPUT in available:  # a model advsentry did not export: its logits suffice
            return Serving("blackbox", (LOGITS_OUTPUT,))
        return None

    @property
    def blackbox(self) -> bool:
        """Whether this detector can score from the logits and the request's pixels alone (black-box mode)."""
        return computable_outside(self.detector.features)

    def missing_outputs(self) -> str:
        """What a model must serve for this detector (for error messages)."""
        return f"{self.entropy_output!r} (its signals, `advsentry export-model --calibration`) or the maps " \
               f"{list(self.feature_outputs)}"

    def score(self, maps: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores ``[N]`` for maps keyed by Triton output name (runs the detector; blocking).

        Black-box mode: ``maps`` holds the logits, the request's pixels
        (:data:`BLACKBOX_PIXELS`) and the logits of its transformed copies
        (:data:`TRANSFORMED_PREFIX`), and the signals are computed here.
        """
        import torch

        if BLACKBOX_PIXELS in maps:
            transformed = {name[len(TRANSFORMED_PREFIX):]: values for name, values in maps.items()
                           if name.startswith(TRANSFORMED_PREFIX)}
            entropies = self.detector.outside_entropies(maps[BLACKBOX_PIXELS], maps[LOGITS_OUTPUT], transformed)
            return self.detector.score_entropies(entropies)
        tensors = {
            self.output_to_map[name]: torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
            for name, array in maps.items()
        }
        with torch.no_grad():
            entropies = self.detector.entropies(tensors)
        # Combined exactly as when Triton computed the entropies, so both paths give the same score.
        return self.detector.score_entropies(entropies.to("cpu").numpy())

    def score_entropies(self, entropies: np.ndarray) -> np.ndarray:
        """Scores ``[N]`` from the model's entropy output ``[N, F]`` (microseconds; runs inline)."""
        if entropies.ndim != 2 or entropies.shape[1] != len(self.output_to_map):
            raise ValueError(
                f"entropy output {self.entropy_output!r} has shape {list(entropies.shape)}, "
                f"expected [batch, {len(self.output_to_map)}]"
            )
        return self.detector.score_entropies(entropies)


def advsentry_outputs(outputs: Iterable[str]) -> bool:
    """Whether a model's outputs include anything advsentry exports (signals, or the shipped detectors' maps).

    Such a model was exported to be protected; under ``protect_all`` it is
    protected even when it serves another calibration's signals than the one
    in force (and then counted unscored, never silently passed through).
    """
    from detector import DEFAULT_FEATURES

    names = set(outputs)
    return any(name.startswith(ENTROPY_OUTPUT_PREFIX) for name in names) or bool(
        names & ({*GENERIC_FEATURES} | {*DEFAULT_FEATURES})
    )


def _file_signature(path: Path) -> tuple[int, int, str] | None:
    try:
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, digest


class DetectorRegistry:
    """Builds and holds the detector snapshot of each protected model; reloads changed calibration files."""

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
        #: each model's outputs as last read from its metadata: what a reload is checked against
        self._outputs: dict[str, frozenset[str]] = {}
        self._signatures: dict[Path, tuple[int, int, str] | None] = {}
        # Models served by the model-agnostic detector (they expose the generic map,
        # not the default's): never given the default calibration, which is for other maps.
        self._generic: set[str] = set()
        #: what is in force for each calibration file: new models get this, not a refused newer file on disk
        self._in_force: dict[Path, DetectorSpec] = {}
        # The default detector (no model-specific file): validated once at start.
        self._template = self._build(None, self.default_calibration)
        for path in {self.default_calibration, *self.per_model_calibration.values()} - {None}:
            if path.is_file():  # a shipped name without a file (``paper``) has nothing to watch
                self._signatures[path] = _file_signature(path)
        for model in self.per_model_calibration:
            self.get(model)  # fail fast on a bad per-model artifact

    # ---- building -------------------------------------------------------------------------------

    def _calibration_path(self, model: str | None) -> Path | None:
        if model is not None and model in self.per_model_calibration:
            return self.per_model_calibration[model]
        if model in self._generic:
            return None
        return self.default_calibration

    def _build(self, model: str | None, path: Path | None, spec: DetectorSpec | None = None) -> Detector:
        identity = self.model_identity.get(model) if model else None
        if path is None:
            return Detector(GENERIC_FEATURES if model in self._generic else None, device=self.device)
        if spec is None:  # the content in force (read once), not whatever the file holds now
            spec = self._in_force.get(path)
            if spec is None:
                spec = self._in_force.setdefault(path, resolve_detector(path))
        return Detector.from_spec(spec, model_identity=identity, device=self.device)

    def _wrap(self, model: str, detector: Detector, path: Path | None) -> ModelDetector:
        outputs = self.per_model_outputs.get(model) or detector.feature_outputs
        if len(outputs) != len(detector.feature_outputs):
            raise CalibrationError(
                f"model {model!r} is configured with feature outputs {list(outputs)} but the detector "
                f"reads {len(detector.feature_outputs)} map(s) {list(detector.feature_outputs)}"
            )
        return ModelDetector(model, detector, dict(zip(outputs, detector.feature_outputs)), str(path) if path else None)

    def template(self, model: str) -> ModelDetector:
        """The default detector as it would serve ``model`` (for deciding auto-protection; not kept)."""
        return self._wrap(model, self._template, self.default_calibration)

    @staticmethod
    def generic_serves(outputs: Iterable[str]) -> bool:
        """Whether a model exposes the model-agnostic map (a user's own model before it has a calibration)."""
        names = set(outputs)
        return set(GENERIC_FEATURES) <= names or _GENERIC_ENTROPY_OUTPUT in names

    # ---- lookup ---------------------------------------------------------------------------------

    def known_outputs(self, model: str) -> frozenset[str] | None:
        with self._lock:
            return self._outputs.get(model)

    def get(self, model: str, *, outputs: Iterable[str] | None = None, generic: bool = False) -> ModelDetector:
        """The model's detector snapshot (built on first use). Raises ``CalibrationError`` for a bad artifact.

        ``outputs``: the model's outputs from its metadata, remembered so a
        reload can be checked against them. A model first seen with the
        model-agnostic map but not the default detector's outputs gets the
        model-agnostic detector (``generic`` forces it).
        """
        with self._lock:
            if outputs is not None:
                self._outputs[model] = frozenset(outputs)
            found = self._detectors.get(model)
            if found is not None:
                return found
            if model not in self.per_model_calibration and (generic or (
                    outputs is not None and self.template(model).serving(outputs) is None
                    and self.generic_serves(outputs))):
                self._generic.add(model)
        path = self._calibration_path(model)
        built = self._wrap(model, self._build(model, path), path)
        with self._lock:
            self._detectors.setdefault(model, built)
            found = self._detectors[model]
        self._publish(found)
        return found

    def known(self) -> list[ModelDetector]:
        with self._lock:
            return list(self._detectors.values())

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
            self.metrics.declare_model(model_detector.model)

    # ---- hot reload -----------------------------------------------------------------------------

    def _rebuild(self, path: Path, models: list[str]) -> tuple[DetectorSpec, Detector, dict[str, ModelDetector]]:
        """New snapshots of ``models`` from ``path``; raises :class:`ReloadRefused` naming the first that cannot use it."""
        anyone = models[0] if models else ALL_MODELS
        try:
            spec = resolve_detector(path)
            template = self._build(None, path, spec)
        except (CalibrationError, ValueError, OSError) as error:
            raise ReloadRefused(anyone, "invalid_artifact", str(error)) from error
        rebuilt: dict[str, ModelDetector] = {}
        for model in models:
            identity = self.model_identity.get(model)
            problems = spec.artifact.mismatches(spec.features, identity) if spec.artifact and identity else []
            if problems:
                raise ReloadRefused(model, "model_mismatch", f"{path} is not for model {model!r}: " + "; ".join(problems))
            try:
                new = self._wrap(model, self._build(model, path, spec), path)
            except (CalibrationError, ValueError) as error:  # e.g. the model's configured outputs do not fit
                raise ReloadRefused(model, "outputs_missing", str(error)) from error
            outputs = self.known_outputs(model)
            if outputs is not None and new.serving(outputs) is None:
                raise ReloadRefused(
                    model, "outputs_missing",
                    f"model {model!r} does not serve calibration {new.calibration_id}: it needs "
                    f"{new.missing_outputs()}, the model serves {sorted(outputs)}; re-export the model for it "
                    "(advsentry export-model --calibration FILE) before switching",
                )
            rebuilt[model] = new
        return spec, template, rebuilt

    def check_reload(self) -> list[str]:
        """Reload changed calibration files now; returns what happened (for logs and tests)."""
        events: list[str] = []
        for path, old in list(self._signatures.items()):
            new = _file_signature(path)
            if new == old:
                continue
            self._signatures[path] = new
            with self._lock:
                models = sorted(m for m in self._detectors if self._calibration_path(m) == path)
            try:
                spec, template, rebuilt = self._rebuild(path, models)
            except ReloadRefused as refusal:
                LOGGER.error("calibration %s refused (%s), keeping the one in force for %s: %s", path, refusal.reason,
                             ", ".join(models) or "every model", refusal)
                if self.metrics is not None:
                    self.metrics.calibration_reloads.labels("refused").inc()
                    self.metrics.calibration_reload_failures.labels(refusal.model, refusal.reason).inc()
                events.append(f"refused {path} ({refusal.reason}): {refusal}")
                continue
            with self._lock:
                if path == self.default_calibration:
                    self._template = template
                self._in_force[path] = spec
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


@dataclass(frozen=True)
class BatchKey:
    """What the micro-batcher groups by: one detector snapshot and the shapes of its maps."""

    detector: ModelDetector
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def model(self) -> str:
        return self.detector.model


def score_batch(key: BatchKey, maps: Mapping[str, np.ndarray]) -> np.ndarray:
    """The batcher's score function: the snapshot the requests carried scores their merged maps."""
    return key.detector.score(maps)
