"""``advsentry calibrate traffic``: a threshold from the score sketches the sidecars kept of live traffic (issue 12).

It lives in ``service/``, beside the hooks whose sketches it reads (``service/hooks/traffic.py``)
because it talks to running sidecars over their gRPC API; ``detector/`` stays
free of the service.

Sources are sidecar state files (``traffic_state_path``) or running sidecars
(``HOST:PORT``, read with the ``GetTrafficState`` RPC); their sketches are
merged (DDSketch merges exactly: the merged sketch is the sketch of the union
of the streams) and the series of one model under one calibration — the base
artifact's, so every score was produced by the same detector and combiner — is
turned into a normal calibration artifact: the base's maps and combiner, the
threshold at a quantile of the traffic's scores, the target FPR, and where the
number came from (sources, scores, window, trim).

The threshold and its biases. Let a share ``a`` of the traffic be adversarial,
with detection rate ``TPR(t)`` at threshold ``t``. The traffic's exceedance is
``P(s > t) = (1 − a)·FPR(t) + a·TPR(t)``.

- ``--trim 0`` takes ``t`` at the ``1 − target`` quantile, so
  ``FPR = (target − a·TPR) / (1 − a) ≤ target``: attacks in the upper tail push
  the threshold *up*; fewer false alarms than the target on clean inputs and
  more missed attacks. When ``a`` approaches the target (and the attacks score
  high), the threshold climbs into the attacks' own scores.
- ``--trim r`` assumes up to a share ``r`` is adversarial and all of it above
  the threshold, and takes ``t`` at the ``(1 − r)(1 − target)`` quantile
  (exceedance ``(1 − r)·target + r``). When ``a = r`` and ``TPR = 1`` the clean FPR is
  the target. When the traffic holds fewer attacks than ``r`` (or attacks that
  score low), the threshold is *lower* than needed: clean traffic is flagged
  up to ``target + r·(1 − target)`` (all of ``r`` becomes false alarms on
  clean traffic). Trimming trades misses for false alarms; it cannot tell the
  two apart — no threshold from unlabelled traffic can.
- The sketch adds its own, small error: the quantile is within the relative
  accuracy ``α`` (default 0.5 %) of the exact one, ``|t̂ − t| ≤ α·|t|``.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detector.calibration import CalibrationArtifact

from .hooks.traffic import TrafficState, TrafficStateError, fraction_above, merge_states, quantile, write_atomic

#: fewer expected scores above the threshold than this and the quantile is mostly noise
MIN_EXPECTED_ABOVE = 10


class TrafficCalibrationError(ValueError):
    """The traffic sources cannot be read, or hold no usable series."""


def quantile_level(target_fpr: float, trim: float) -> float:
    """The traffic quantile whose exceedance is ``(1 − trim)·target + trim`` (see the module docstring)."""
    if not 0 < target_fpr < 1:
        raise TrafficCalibrationError(f"--target-fpr must be in (0, 1), got {target_fpr}")
    if not 0 <= trim < 1:
        raise TrafficCalibrationError(f"--trim must be in [0, 1), got {trim}")
    return (1.0 - trim) * (1.0 - target_fpr)


def _iso(seconds: float | None) -> str | None:
    if seconds is None or not math.isfinite(seconds):
        return None
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_endpoint(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit()) and not Path(text).exists()


def read_source(source: str, *, model: str | None = None, metadata: Sequence[tuple[str, str]] = (),
                ca_file: Path | None = None, timeout_s: float = 30.0) -> TrafficState:
    """One source's :class:`~service.hooks.traffic.TrafficState`: a state file, or a sidecar's ``GetTrafficState``."""
    try:
        if not _is_endpoint(source):
            return TrafficState.load(source)
        import grpc

        from ._proto.advsentry.v1 import detector_pb2, detector_pb2_grpc

        if ca_file is not None:
            channel = grpc.secure_channel(source, grpc.ssl_channel_credentials(Path(ca_file).read_bytes()))
        else:
            channel = grpc.insecure_channel(source)
        with channel:
            stub = detector_pb2_grpc.DetectorServiceStub(channel)
            try:
                reply = stub.GetTrafficState(detector_pb2.GetTrafficStateRequest(model_name=model or ""),
                                             timeout=timeout_s, metadata=list(metadata) or None)
            except grpc.RpcError as error:
                raise TrafficCalibrationError(f"{source}: GetTrafficState failed: {error.code().name}: "
                                              f"{error.details()}") from None
        return TrafficState.from_json(reply.state_json, source=source)
    except TrafficStateError as error:
        raise TrafficCalibrationError(str(error)) from None


@dataclass(frozen=True)
class TrafficCalibration:
    artifact: CalibrationArtifact
    scores: int
    quantile: float
    base_implied_fpr: float | None  # share of the traffic above the base artifact's threshold


def calibrate_from_traffic(
    sources: Sequence[str],
    *,
    target_fpr: float,
    base: CalibrationArtifact,
    base_source: str,
    model: str | None = None,
    trim: float = 0.0,
    metadata: Sequence[tuple[str, str]] = (),
    ca_file: Path | None = None,
) -> TrafficCalibration:
    """Merge the sources' sketches and derive the artifact (not written; see :func:`write`)."""

    if not sources:
        raise TrafficCalibrationError("--from needs at least one HOST:PORT or state file")
    level = quantile_level(target_fpr, trim)
    states = [read_source(s, model=model, metadata=metadata, ca_file=ca_file) for s in sources]
    try:
        merged = merge_states(states)
    except TrafficStateError as error:
        raise TrafficCalibrationError(str(error)) from None
    candidates = [s for s in merged.series.values() if s.calibration_id == base.id and (model is None or s.model == model)]
    available = ", ".join(f"{s.model} under {s.calibration_id} ({s.count} scores)" for s in merged.series.values()) or "none"
    if not candidates:
        raise TrafficCalibrationError(
            f"no traffic of {'model ' + repr(model) if model else 'any model'} under the base calibration {base.id} "
            f"({base_source}); the sources hold: {available}. Pass the artifact that was in force as --base "
            "(scores of another calibration were produced by another detector or combiner).")
    if len(candidates) > 1:
        raise TrafficCalibrationError(f"traffic of several models under {base.id}: choose one with --model "
                                      f"({', '.join(s.model for s in candidates)})")
    series = candidates[0]
    sketch = series.merged(merged.relative_accuracy)
    count = int(round(sketch.count))
    if count == 0:
        raise TrafficCalibrationError(f"the series of {series.model} under {base.id} holds no scores")
    threshold = quantile(sketch, level)
    assert threshold is not None
    expected_above = count * (1.0 - level)
    data: dict[str, Any] = {
        "source": "traffic",
        "traffic": {
            "sources": list(sources),
            "model": series.model,
            "versions": sorted(series.versions),
            "base_calibration": {"id": base.id, "source": base_source, "threshold": base.threshold,
                                 "target_fpr": base.target_fpr},
            "scores": count,
            "non_finite_scores": series.non_finite,
            "windows": len(series.windows),
            "first_seen": _iso(series.first_seen),
            "last_seen": _iso(series.last_seen),
            "window_s": merged.window_s,
            "relative_accuracy": merged.relative_accuracy,
            "trim": trim,
            "quantile": level,
            "sufficient": expected_above >= MIN_EXPECTED_ABOVE,
            "note": "threshold at the quantile (1 - trim)(1 - target_fpr) of the traffic's scores; traffic holds "
                    "attacks too: without trim they push the threshold up (clean FPR at most the target), with "
                    "trim the clean FPR is at most target + trim (see `advsentry calibrate traffic --help`)",
        },
    }
    results = {"traffic_exceedance_at_threshold": fraction_above(sketch, threshold),
               "traffic_implied_fpr_of_base_threshold": fraction_above(sketch, base.threshold)}
    artifact = CalibrationArtifact.create(threshold, dict(base.features), base.model, base.combiner,
                                          target_fpr=target_fpr, data=data, results=results,
                                          job={"kind": "traffic", "target_fpr": target_fpr, "trim": trim})
    # the same checks the sidecar applies when it loads the file
    artifact = CalibrationArtifact.from_document(artifact.to_document(), source="traffic calibration")
    return TrafficCalibration(artifact, count, level, results["traffic_implied_fpr_of_base_threshold"])


def write(calibration: TrafficCalibration, out: Path) -> None:
    """Write the artifact atomically (a sidecar polling ``out`` never sees half a file)."""
    import json


    document = calibration.artifact.to_document()
    write_atomic(Path(out), (json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
