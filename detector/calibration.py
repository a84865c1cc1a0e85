"""The calibration artifact: a threshold together with everything it is only valid for.

A threshold means something only for the exact score definition (every
ScoreConfig field, the combiner) and the exact model weights it was fitted on.
The artifact is a versioned JSON document that carries all of them, plus
provenance (created-at, library versions) and a SHA-256 checksum over its
canonical form, so that a hand-edited or truncated file is refused instead of
silently moving the decision boundary.

Schema ``advsentry.calibration/v1``::

    {"schema": "advsentry.calibration/v1",
     "id": "...", "created_at": "2026-...Z",
     "threshold": 2.71,
     "features": {"feature_response": {ScoreConfig fields}},
     "feature_order": ["feature_response"],   # the combiner's weights follow this order
     "combiner": {"kind": "single"} | {"kind": "logistic", ...},
     "model": {"name": ..., "weights_sha256": ...},
     "versions": {"advsentry": ..., "torch": ..., "numpy": ...},
     "target_fpr": 0.05 | null, "data": {...}, "results": {...},
     "job": {...},            (optional: the calibration job's settings)
     "checksum": "sha256 of the canonical JSON of all other fields"}

``job`` is written only when set, so artifacts without it keep their
canonical form (and checksum) unchanged.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .combiner import Combiner, SingleMap, combiner_from_dict
from .config import ConfigError, ScoreConfig
from .models import ModelIdentity
from .signals import FeatureConfig, SignalError, feature_differences, feature_from_dict

SCHEMA = "advsentry.calibration/v1"
_REQUIRED = (
    "schema", "id", "created_at", "threshold", "features", "feature_order", "combiner", "model", "versions", "checksum",
)


class CalibrationError(ValueError):
    """A calibration artifact is malformed, tampered with, or does not match the detector."""


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of advsentry, torch, numpy and the ``extra`` packages."""
    from importlib import metadata

    versions = {}
    for package in ("advsentry", "torch", "numpy", *extra):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _canonical(document: dict[str, Any]) -> bytes:
    body = {key: value for key, value in document.items() if key != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _checksum(document: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(document)).hexdigest()


@dataclass(frozen=True)
class CalibrationArtifact:
    threshold: float
    features: dict[str, FeatureConfig]
    model: ModelIdentity
    combiner: Combiner = field(default_factory=SingleMap)
    id: str = ""
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    target_fpr: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        threshold: float,
        features: dict[str, FeatureConfig],
        model: ModelIdentity,
        combiner: Combiner | None = None,
        **extra: Any,
    ) -> "CalibrationArtifact":
        """A new artifact stamped with the current time and library versions (``versions=`` overrides)."""
        created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        versions = extra.pop("versions", None) or library_versions()
        return cls(
            threshold=float(threshold),
            features=dict(features),
            model=model,
            combiner=combiner or SingleMap(),
            created_at=created,
            versions=versions,
            **extra,
        )

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "schema": SCHEMA,
            "id": self.id,
            "created_at": self.created_at,
            "threshold": self.threshold,
            "features": {name: config.to_dict() for name, config in self.features.items()},
            # JSON objects are unordered (and written with sorted keys); the combiner's
            # weights follow this order, so it is stored explicitly.
            "feature_order": list(self.features),
            "combiner": self.combiner.to_dict(),
            "model": self.model.to_dict(),
            "versions": dict(self.versions),
            "target_fpr": self.target_fpr,
            "data": self.data,
            "results": self.results,
        }
        if self.job:
            document["job"] = self.job
        if not document["id"]:  # content-derived id: the same calibration has the same id
            document["id"] = "cal-" + _checksum(document)[:12]
        document["checksum"] = _checksum(document)
        return document

    def save(self, path: str | Path) -> dict[str, Any]:
        document = self.to_document()
        Path(path).write_text(json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n")
        return document

    @classmethod
    def from_document(cls, document: Any, *, source: str = "artifact") -> "CalibrationArtifact":
        if not isinstance(document, dict):
            raise CalibrationError(f"{source}: expected a JSON object, got {type(document).__name__}")
        if document.get("schema") != SCHEMA:
            raise CalibrationError(f"{source}: schema is {document.get('schema')!r}, expected {SCHEMA!r}")
        missing = [key for key in _REQUIRED if key not in document]
        if missing:
            raise CalibrationError(f"{source}: missing field(s) {', '.join(missing)}")
        if document["checksum"] != _checksum(document):
            raise CalibrationError(
                f"{source}: checksum mismatch, the file was modified after it was written "
                "(re-run the calibration instead of editing the artifact)"
            )
        try:
            threshold = float(document["threshold"])
            if not math.isfinite(threshold):
                raise ValueError("threshold is not finite")
            order = list(document["feature_order"])
            if sorted(order) != sorted(document["features"]) or len(set(order)) != len(order):
                raise ValueError(f"feature_order {order} does not list the features {sorted(document['features'])}")
            features = {name: feature_from_dict(document["features"][name]) for name in order}
            if not features:
                raise ValueError("no features")
            model = ModelIdentity(str(document["model"]["name"]), str(document["model"]["weights_sha256"]))
            combiner = combiner_from_dict(document["combiner"])
            expected = 1 if isinstance(combiner, SingleMap) else len(getattr(combiner, "weights", ()))
            if expected != len(features):
                raise ValueError(f"combiner {combiner.kind!r} takes {expected} map(s) but {len(features)} are configured")
        except (ConfigError, SignalError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise CalibrationError(f"{source}: invalid content: {error}") from error
        return cls(
            threshold=threshold,
            features=features,
            model=model,
            combiner=combiner,
            id=str(document["id"]),
            created_at=str(document["created_at"]),
            versions=dict(document["versions"]),
            target_fpr=document.get("target_fpr"),
            data=dict(document.get("data") or {}),
            results=dict(document.get("results") or {}),
            job=dict(document.get("job") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationArtifact":
        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError as error:
            raise CalibrationError(f"{path}: no such file") from error
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CalibrationError(f"{path}: not a readable JSON file ({error})") from error
        return cls.from_document(document, source=str(path))

    def mismatches(self, features: dict[str, FeatureConfig], model: ModelIdentity | None) -> list[str]:
        """What differs between this artifact and a detector's configuration (empty = compatible)."""
        problems = []
        if set(self.features) != set(features):
            problems.append(f"feature maps: artifact has {sorted(self.features)}, detector has {sorted(features)}")
        else:
            for name, config in features.items():
                for difference in feature_differences(self.features[name], config):
                    problems.append(f"score config of {name!r}: {difference} (artifact != detector)")
        if model is not None and model != self.model:
            if model.name != self.model.name:
                problems.append(f"model: artifact was fitted on {self.model.name!r}, detector runs {model.name!r}")
            if model.weights_sha256 != self.model.weights_sha256:
                problems.append(
                    f"model weights: artifact sha256 {self.model.weights_sha256[:12]}…, "
                    f"detector sha256 {model.weights_sha256[:12]}…"
                )
        return problems
