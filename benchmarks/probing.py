"""Probing detection (issue 12, part 2): how fast are black-box attacks caught, and how often are clean clients?

Stages (each stored in the result JSON as it finishes; a rerun skips finished
stages unless ``--fresh``):

1. ``attacks_offline``: Square, HopSkipJump, boundary and one-pixel attack a
   few bundled photos through a *recording* prediction callable on the local
   bundled model; every image the attack sends is embedded (both candidate
   embeddings) and its answer recorded. This gives the complete query streams
   cheaply (no detector scoring) for the embedding choice and parameter sweeps.
2. ``embedding_choice``: the input-space embedding (``detector.embedding``:
   16x16 area-pooled, mean-centred, projected to 64) against the model's pooled
   penultimate features (1280 -> the same seeded projection to 64): clean dev
   clients' kNN distances (a subsample of the corpus dev part) against the
   attacks' kNN distances. The served embedding is the one with the wider gap.
3. ``threshold``: simulated clean clients (``--clients`` x ``--queries``, each
   drawing distinct corpus **dev** images in random order) through the same
   :class:`service.hooks.probing.ProbingDetector` the sidecar runs (offline, on
   precomputed embeddings, not through gRPC); the threshold is half the 0.1 %
   quantile of the clients' smallest kNN distance (a 2x margin below the
   clean tail), for k in a small sweep.
4. ``clean_test``: the same on the corpus **test** part: share of clean
   clients flagged with the chosen threshold (the false-alarm goal).
5. ``video``: a benign burst (30 consecutive "video frames": small shifts,
   crops and brightness changes of one photo) as one client: flagged (the
   documented limitation; allow-list such clients).
6. ``attacks_offline_detection``: the offline streams through the detector:
   queries until detection vs queries until the attack succeeded.
7. ``sidecar``: a real Triton (the exported bundled model, serving
   ``advsentry_embedding``) and a real sidecar (``probing_policy=reject``,
   ``client_id_metadata_key=x-client-id``); each attack runs as its own client
   (``benchmarks.attack_client.AttackClient``), recording the first call that
   carried ``advsentry_probing=true`` (the detecting call is still served) or
   was refused. Under ``reject`` the client is refused from the next call on,
   so each run ends right after its detection (the full attacks ran offline
   in stage 1; the default detector scores every query in Triton, which is
   what makes this stage slow on CPU).
8. ``cost``: the detector's per-query cost (``observe`` of one embedding)
   against histories of 100 and 1000.
9. ``queries_to_success``: the reference the detection goal is judged
   against, measured here rather than assumed: every attack configuration
   the run uses attacks ``--reference-images`` corpus **dev** images (one per
   source, seeded; never test images) on the bundled model, with no
   detector, and records per image the queries until the model is first
   fooled *within the attack's budget* (:func:`success_budget`). The median
   over the images where that happened (with the success share) is the
   attack's median queries-to-success; each image's result is stored as it
   finishes, so an interrupted run resumes.

``--smoke``: bundled photos instead of the corpus, tiny attacks, no sidecar,
two reference images (seconds; checks the code, not a result). Results:
``benchmarks/results/probing.{json,md}``; the recorded attack streams are
cached under ``--cache`` (default ``.cache/probing``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, load_average, machine

FLAG_GOAL = 0.001  # at most 0.1 % of clean clients flagged
MEDIAN_DETECTION_GOAL = 10

#: Full-length attacks (offline): parameters sized so each ends within a few hundred queries.
#: A key other than an attack's name names a variant; its ``attack`` entry is the attack.
ATTACKS: dict[str, dict[str, Any]] = {
    "square": {"eps": 8 / 255, "n_queries": 200},
    # 8/255 fools most bundled photos with Square's first (stripe) query; 4/255 needs a real search.
    "square_eps4": {"attack": "square", "eps": 4 / 255, "n_queries": 200},
    "hopskipjump": {"max_iter": 3, "max_eval": 100, "init_eval": 20},
    "boundary": {"max_iter": 10},
    "one_pixel": {"popsize": 40, "max_iter": 5},
}
SMOKE_ATTACKS: dict[str, dict[str, Any]] = {
    "square": {"eps": 8 / 255, "n_queries": 8},
    "one_pixel": {"popsize": 8, "max_iter": 1},
}
#: Perturbation size, as an L-infinity bound, that success means for attacks without a budget of their own
#: (HopSkipJump, boundary: minimal-perturbation L2 attacks). See :func:`success_budget`.
DECISION_SUCCESS_LINF = ATTACKS["square"]["eps"]
K_SWEEP = (4, 8, 16)
DEFAULT_K = 8
MIN_QUERIES = 3
HISTORY = 100


# --- embeddings ------------------------------------------------------------------------------------


class FeatureEmbedder:
    """Candidate 2: the bundled model's pooled penultimate features, seeded projection to 64, unit length."""

    def __init__(self, model: torch.nn.Module, dim: int = 64, seed: int = 0) -> None:
        self.model = model
        self.captured: list[torch.Tensor] = []
        model.net._avg_pooling.register_forward_hook(lambda _m, _i, out: self.captured.append(out.flatten(1)))
        rng = np.random.default_rng(seed)
        self.matrix = torch.from_numpy((rng.standard_normal((1280, dim)) / np.sqrt(dim)).astype(np.float32))

    def take(self) -> np.ndarray:
        features = torch.cat(self.captured)
        self.captured.clear()
        z = features @ self.matrix
        return (z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()

    def embed(self, pixels: torch.Tensor, batch: int = 16) -> np.ndarray:
        with torch.no_grad():
            for chunk in pixels.split(batch):
                self.model(chunk)
        return self.take()


def _clean_pixels(images, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    from detector.samples import to_tensor

    chosen = list(images)
    if limit is not None and len(chosen) > limit:
        order = np.random.default_rng(seed).permutation(len(chosen))[:limit]
        chosen = [chosen[i] for i in sorted(order)]
    return to_tensor([image.pixels() for image in chosen]), [getattr(image, "source", str(i)) for i, image in
                                                            enumerate(chosen)]


def _smoke_images():
    """Bundled photos, their mirror images and two crops each: a stand-in 'corpus' for smoke runs."""
    from detector.samples import full_photo_samples, to_tensor

    pixels = to_tensor([s.pixels() for s in full_photo_samples()])
    crops = torch.nn.functional.interpolate(pixels[:, :, 20:200, 10:190], size=224, mode="bilinear")
    return torch.cat([pixels, pixels.flip(3), crops])


# --- clean clients ---------------------------------------------------------------------------------


def simulate_clients(embeddings: np.ndarray, *, clients: int, queries: int, k: int, threshold: float,
                     seed: int) -> dict[str, Any]:
    """Each client sends ``queries`` distinct images in random order through one :class:`ProbingDetector`."""
    from service.hooks.probing import ProbingDetector

    rng = np.random.default_rng(seed)
    detector = ProbingDetector(threshold=threshold, k=k, min_queries=MIN_QUERIES, history=HISTORY,
                               max_clients=clients + 1, cooldown_s=1e9, clock=lambda: 0.0)
    minima, flagged, all_distances = [], 0, []
    n = min(queries, len(embeddings))
    for client in range(clients):
        order = rng.choice(len(embeddings), n, replace=False)
        results = detector.observe(f"c{client}", embeddings[order])
        distances = [r.distance for r in results if r.distance is not None]
        all_distances.extend(distances)
        minima.append(min(distances))
        flagged += any(r.detected for r in results)
    minima_array = np.array(minima)
    return {
        "clients": clients, "queries": n, "k": k, "threshold": threshold, "flagged": flagged,
        "flagged_share": flagged / clients,
        "client_min_distance": {q: float(np.quantile(minima_array, float(q))) for q in
                                ("0.0", "0.001", "0.01", "0.1", "0.5")},
        "query_distance": {q: float(np.quantile(all_distances, float(q))) for q in ("0.001", "0.01", "0.5")},
    }


def choose_threshold(client_min_q001: float) -> float:
    """Half the 0.1 % quantile of clean dev clients' smallest kNN distance, rounded down to 2 significant digits."""
    value = client_min_q001 / 2
    digits = -int(np.floor(np.log10(value))) + 1
    return float(np.floor(value * 10**digits) / 10**digits)


# --- attacks ---------------------------------------------------------------------------------------


def _attack(name: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(attack name, its parameters) of an :data:`ATTACKS` entry (a variant names its attack)."""
    params = dict(params)
    return params.pop("attack", name), params


def record_attack_streams(model, feature: FeatureEmbedder, pixels: torch.Tensor, attacks: dict[str, dict[str, Any]],
                          seed: int = 0, done: set[str] = frozenset()) -> dict[str, Any]:
    """Run each attack offline on each image (keys not in ``done``); per query: both embeddings, fooled or not."""
    from detector.attacks import QueryModel, make_attack
    from detector.embedding import embed

    streams: dict[str, Any] = {}
    for name, entry in attacks.items():
        algorithm, params = _attack(name, entry)
        for index in range(len(pixels)):
            if f"{name}/{index}" in done:
                continue
            clean = pixels[index:index + 1]
            with torch.no_grad():
                label = int(model(clean).argmax(1))
            feature.captured.clear()
            sent: list[np.ndarray] = []
            features: list[np.ndarray] = []
            fooled: list[bool] = []

            def predict(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    logits = model(x)
                sent.append(embed(x))
                features.append(feature.take())
                fooled.extend((logits.argmax(1) != label).tolist())
                return logits

            started = time.perf_counter()
            result = make_attack(algorithm, QueryModel(predict, max_batch=8), seed=seed + index, quantize=True,
                                 **params)(clean, torch.tensor([label]))
            streams[f"{name}/{index}"] = {
                "attack": name, "image": index, "params": params,
                "pixels": np.concatenate(sent), "features": np.concatenate(features),
                "fooled": np.array(fooled), "success": bool(result.success[0]),
                "attack_queries": float(result.queries[0]) if result.queries is not None else None,
                "linf": float(result.norms["linf"][0]), "l2": float(result.norms["l2"][0]),
                "seconds": time.perf_counter() - started,
            }
    return streams


def stream_detection(embeddings: np.ndarray, *, threshold: float, k: int) -> dict[str, Any]:
    """Queries (1-based) until the first detection of one client's stream; kNN distances of the judged queries."""
    from service.hooks.probing import ProbingDetector

    detector = ProbingDetector(threshold=threshold, k=k, min_queries=MIN_QUERIES, history=HISTORY,
                               cooldown_s=1e9, clock=lambda: 0.0)
    results = detector.observe("attacker", embeddings)
    first = next((i + 1 for i, r in enumerate(results) if r.detected), None)
    distances = [r.distance for r in results if r.distance is not None]
    return {"queries_until_detection": first, "detections": sum(r.detected for r in results),
            "median_distance": float(np.median(distances)) if distances else None}


def _first_fooled(stream: dict[str, Any]) -> int | None:
    hits = np.flatnonzero(stream["fooled"])
    return int(hits[0]) + 1 if len(hits) else None


# --- video burst -----------------------------------------------------------------------------------


def video_frames(image: torch.Tensor, count: int = 30, seed: int = 0) -> torch.Tensor:
    """``count`` consecutive 'frames': a slow pan (1 px/frame), a slight zoom and brightness drift, sensor noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(count):
        shift = t
        crop = image[:, :, 8:216, 8 + shift // 2:216 + shift // 2] if t % 2 else image[:, :, 8:216, 8:216]
        frame = torch.nn.functional.interpolate(crop, size=224, mode="bilinear", align_corners=False)
        frame = frame * (1 + 0.01 * np.sin(t / 3)) + torch.from_numpy(
            rng.normal(0, 2 / 255, frame.shape).astype(np.float32))
        frames.append(frame.clamp(0, 1))
    return torch.cat(frames)


# --- through the sidecar ---------------------------------------------------------------------------


def sidecar_runs(pixels: torch.Tensor, attacks: dict[str, dict[str, Any]], threshold: float, k: int,
                 workdir: Path, runs: dict[str, Any], save) -> dict[str, Any]:
    """Each attack as its own client of a real sidecar (annotate) in front of a real Triton."""
    import sys

    tests_dir = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests_dir))
    from benchmarks.attack_client import AttackClient
    from detector.models import bundled_identity
    from e2e_triton import MODEL, RunningSidecar, export_bundled, make_settings
    from service.triton.server import TritonServer

    todo = [(name, index) for name in attacks for index in range(len(pixels)) if f"{name}-{index}" not in runs]
    if not todo:
        return runs
    triton = TritonServer(export_bundled(workdir / "repo"))
    triton.start()
    try:
        # A loaded CPU can take longer than the default 30 s upstream deadline for the first calls.
        sidecar = RunningSidecar(make_settings(
            upstream=triton.grpc_address, client_id_metadata_key="x-client-id", probing_policy="reject",
            probing_threshold=threshold, probing_k=k, probing_min_queries=MIN_QUERIES, probing_history=HISTORY,
            upstream_timeout_s=600.0,
        ), model_identity={MODEL: bundled_identity()})
        try:
            with AttackClient(sidecar.address, MODEL, client_id="warm-up", timeout_s=600) as client:
                client.endpoint.logits(pixels[:1])  # loads the model and the detector's code paths
            for name, index in todo:
                algorithm, params = _attack(name, attacks[name])
                client_id = f"{name}-{index}"
                started = time.perf_counter()
                with AttackClient(sidecar.address, MODEL, client_id=client_id, timeout_s=600) as client:
                    run = client.run(algorithm, pixels[index:index + 1], params=params, seed=index)
                summary = run.summary()
                failed = [r.status for r in run.records if r.status not in ("OK", "PERMISSION_DENIED")]
                if failed:  # a timeout or an upstream error is not a detection
                    raise RuntimeError(f"{client_id}: calls failed with {failed}")
                runs[client_id] = {
                    "attack": name, "image": index, "params": params,
                    "queries_until_detection": summary["queries_until_detection"],
                    "detecting_call_status": next((r.status for r in run.records if r.detected), None),
                    "refused_calls": summary["refused_calls"],
                    "queries_until_success": summary["queries_until_success"],
                    "images_sent": summary["images_sent"], "calls": summary["calls"],
                    "flagged_calls": summary["flagged_calls"], "seconds": time.perf_counter() - started,
                }
                print(f"  sidecar {client_id}: {runs[client_id]}", flush=True)
                save()
        finally:
            sidecar.stop()
    finally:
        triton.stop()
    return runs


# --- cost ------------------------------------------------------------------------------------------


def observe_cost(dim: int = 64) -> dict[str, Any]:
    from service.hooks.probing import ProbingDetector

    rng = np.random.default_rng(0)
    rows = {}
    for history in (100, 1000):
        detector = ProbingDetector(threshold=1e-9, k=DEFAULT_K, history=history, min_queries=MIN_QUERIES)
        data = rng.standard_normal((history + 200, dim)).astype(np.float32)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        detector.observe("c", data[:history])
        samples = []
        for row in data[history:]:
            t0 = time.perf_counter()
            detector.observe("c", row)
            samples.append(time.perf_counter() - t0)
        rows[str(history)] = {"median_us": statistics.median(samples) * 1e6,
                              "p99_us": float(np.quantile(samples, 0.99)) * 1e6,
                              "bytes_per_client": history * dim * 4}
    return rows


# --- the reference: queries until an undefended attack succeeds ----------------------------------


class _Succeeded(Exception):
    """Raised by the recording callable at the first success: nothing after it changes the count.

    The attacks are seeded, so the queries before the first success are the same whether or not the
    attack goes on; stopping there saves most of the time on images the attack wins quickly.
    """


def success_budget(name: str, params: dict[str, Any], image_shape: tuple[int, ...]) -> dict[str, Any]:
    """What 'the model is fooled within the attack's budget' means for one :data:`ATTACKS` entry.

    * Square (L-infinity or L2 ``eps``): a fooled answer to a query within ``eps`` of the clean image.
      Square projects every query into that ball, so this is its first fooled answer.
    * One-pixel: a fooled answer to a query that changes at most ``pixels`` pixels (every query it
      sends does), so also its first fooled answer.
    * HopSkipJump and boundary have no budget: they start from a seeded noise image the model already
      labels differently (their first fooled answer, after two clean-image queries) and walk it towards
      the clean image. That start is not an adversarial example in any useful sense, so counting it
      would make them look like 3-query attacks. They succeed at the first fooled query whose L2
      distance from the clean image is at most that of a full-size L-infinity perturbation at the main
      Square budget (:data:`DECISION_SUCCESS_LINF` x sqrt(pixels x channels), 12.2 for 8/255 at 224x224,
      the L2 size of Square's own successful adversarials): the same perturbation energy, measured in the
      norm these attacks minimize. A blended noise start that is already that close counts, since it is
      then as small as Square's.
    """
    from detector.attacks import make_attack

    algorithm, attack_params = _attack(name, params)
    attack = make_attack(algorithm, lambda x: x, **attack_params)
    if attack.norm in ("linf", "l2") and attack.budget is not None:
        return {"norm": attack.norm, "bound": attack.budget, "rule": f"{attack.norm} <= eps"}
    if attack.norm == "l0":
        return {"norm": "l0", "bound": float(attack.params["pixels"]), "rule": "pixels changed <= pixels"}
    bound = DECISION_SUCCESS_LINF * math.sqrt(math.prod(image_shape))
    return {"norm": "l2", "bound": bound,
            "rule": f"l2 <= {DECISION_SUCCESS_LINF * 255:.0f}/255 x sqrt({math.prod(image_shape)})"}


def reference_images(sources: list[str], count: int, seed: int) -> list[int]:
    """Indices of ``count`` inputs with distinct sources, in a seeded random order of the sources.

    One input per source (an original photo or cut-out gives up to four crops or composites) so that
    no photo is counted twice in the median.
    """
    first: dict[str, int] = {}
    for index, source in enumerate(sources):
        first.setdefault(source, index)
    order = np.random.default_rng(seed).permutation(len(first))
    unique = list(first.values())
    return [unique[i] for i in order[:count]]


def measure_queries_to_success(model: torch.nn.Module, pixels: torch.Tensor, image_ids: list[str],
                               attacks: dict[str, dict[str, Any]], runs: dict[str, Any],
                               save: Callable[[], None], seed: int = 0) -> dict[str, Any]:
    """Each attack on each image with no detector: queries (1-based) until the first success within budget.

    Queries are counted as the detector counts them: every image sent to the model, the attack
    library's clean-image predictions included, so the numbers compare directly with 'queries until
    detection'. ``runs`` holds finished results (keys ``attack/image``) and is updated in place, with
    ``save()`` after each, so an interrupted run resumes; a result measured with other parameters or
    another budget is measured again. ``None``: not fooled within budget before the attack ended.
    """
    from detector.attacks import QueryModel, make_attack
    from detector.attacks.common import perturbation_norms

    for name, entry in attacks.items():
        algorithm, params = _attack(name, entry)
        budget = success_budget(name, entry, tuple(pixels.shape[1:]))
        tolerance = 1e-5 * budget["bound"] + 1e-6  # float round-off of the attacks' own projections
        for position, image_id in enumerate(image_ids):
            key = f"{name}/{image_id}"
            previous = runs.get(key)
            if previous is not None and previous["params"] == params and previous["budget"] == budget:
                continue
            clean = pixels[position:position + 1]
            with torch.no_grad():
                label = int(model(clean).argmax(1))
            state: dict[str, Any] = {"sent": 0, "first_fooled": None, "success": None,
                                     "smallest_fooled": None}

            def predict(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    logits = model(x)
                fooled = (logits.argmax(1) != label).tolist()
                norms = perturbation_norms(x, clean.expand_as(x))
                for i, hit in enumerate(fooled):
                    state["sent"] += 1
                    if not hit:
                        continue
                    state["first_fooled"] = state["first_fooled"] or state["sent"]
                    l2, linf = float(norms["l2"][i]), float(norms["linf"][i])
                    best = state["smallest_fooled"]
                    if best is None or l2 < best["l2"]:
                        state["smallest_fooled"] = {"l2": l2, "linf": linf}
                    if float(norms[budget["norm"]][i]) <= budget["bound"] + tolerance:
                        state["success"] = state["sent"]
                        state["sent"] += len(fooled) - i - 1  # the rest of the call was sent too
                        raise _Succeeded
                return logits

            started = time.perf_counter()
            try:
                make_attack(algorithm, QueryModel(predict, max_batch=8), seed=seed + position, quantize=True,
                            **params)(clean, torch.tensor([label]))
            except _Succeeded:
                pass
            runs[key] = {
                "attack": name, "image": image_id, "params": params, "budget": budget, "label": label,
                "queries_until_success": state["success"], "first_fooled": state["first_fooled"],
                "queries_sent": state["sent"], "smallest_fooled": state["smallest_fooled"],
                "seconds": time.perf_counter() - started,
            }
            print(f"  queries-to-success {key}: {state['success']} (sent {state['sent']}, "
                  f"{runs[key]['seconds']:.1f} s)", flush=True)
            save()
    return runs


def reference_summary(runs: dict[str, Any], attacks: dict[str, dict[str, Any]],
                      image_ids: list[str]) -> dict[str, Any]:
    """Per attack: the median over the images it fooled within budget, the success share, the raw counts."""
    summary = {}
    for name in attacks:
        rows = [runs[f"{name}/{image_id}"] for image_id in image_ids]
        counts = [row["queries_until_success"] for row in rows]
        succeeded = [c for c in counts if c is not None]
        summary[name] = {
            "images": len(rows), "successes": len(succeeded),
            "success_share": len(succeeded) / len(rows) if rows else 0.0,
            "median": float(statistics.median(succeeded)) if succeeded else None,
            "budget": rows[0]["budget"] if rows else None,
            "queries_until_success": counts, "first_fooled": [row["first_fooled"] for row in rows],
            "queries_sent": [row["queries_sent"] for row in rows],
        }
    return summary


# --- report ----------------------------------------------------------------------------------------


def _median(values: list[int | None]) -> float | None:
    """Median with 'never detected' as infinity (None when that is the median)."""
    if not values:
        return None
    value = statistics.median([float("inf") if v is None else v for v in values])
    return None if value == float("inf") else float(value)


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """The goals, judged against the queries-to-success this run measured (``doc["queries_to_success"]``)."""
    threshold = doc["threshold"]["chosen"]
    reference = doc["queries_to_success"]["attacks"]
    per_attack: dict[str, Any] = {}
    for source in ("attacks_offline_detection", "sidecar"):
        for row in doc.get(source, {}).values():
            entry = per_attack.setdefault(row["attack"], {"offline": [], "sidecar": [], "success_offline": [],
                                                          "sent_offline": [], "own_success_first": []})
            entry["offline" if source != "sidecar" else "sidecar"].append(row["queries_until_detection"])
            if source == "sidecar":
                # A run's own success counts only for budgeted attacks (Square: within eps); HopSkipJump's
                # and boundary's first fooled answer is their noise starting point, one-pixel has no budget.
                budgeted = row["params"].get("eps") is not None
                entry["own_success_first"].append(row["queries_until_success"] if budgeted else None)
            else:
                entry["success_offline"].append(row["queries_until_fooled"])
                entry["sent_offline"].append(row["queries_sent"])
    attacks = {}
    for name, entry in per_attack.items():
        # Judged end to end (the sidecar runs: a batched call is answered whole, so its client learns of
        # the detection after the call holding the detecting image); offline, per image, when absent.
        detections = entry["sidecar"] or entry["offline"]
        worst = None if any(v is None for v in detections) else max(detections, default=None)
        measured = reference[name]  # a KeyError here: an attack judged without its measured reference
        goal = measured["median"]
        own = entry["own_success_first"] if entry["sidecar"] else [None] * len(detections)
        # Before success: every run detected, before its own success where it has one (Square), else
        # before the attack's measured median queries-to-success on the bundled model (stage 9). An
        # attack that fooled no reference image within its budget has no success to come first: any
        # detection is in time (the share of 0 says so in the report).
        in_time = [d is not None and d < (o if o is not None else goal if goal is not None else float("inf"))
                   for d, o in zip(detections, own)]
        attacks[name] = {
            "runs": len(detections), "detection_sidecar": entry["sidecar"], "detection_offline": entry["offline"],
            "median_detection": _median(detections), "worst_detection": worst,
            "queries_to_success_goal": goal, "queries_to_success_share": measured["success_share"],
            "queries_to_success_images": measured["images"], "first_fooled_offline": entry["success_offline"],
            "queries_sent_offline": entry["sent_offline"],
            "undetected_runs": sum(v is None for v in detections),
            "own_success_sidecar": entry["own_success_first"],
            "runs_detected_in_time": sum(in_time),
            "before_success": all(in_time) and bool(in_time),
        }
    all_detections = [v for a in attacks.values() for v in (a["detection_sidecar"] or a["detection_offline"])]
    return {
        "threshold": threshold, "k": doc["threshold"]["k"], "attacks": attacks,
        "median_detection": _median(all_detections),
        "clean_test_flagged_share": doc["clean_test"]["flagged_share"],
        "goals": {
            "every_attack_before_success": all(a["before_success"] for a in attacks.values()),
            "median_detection_le_10": (_median(all_detections) or 1e9) <= MEDIAN_DETECTION_GOAL,
            "clean_flagged_le_0.1%": doc["clean_test"]["flagged_share"] <= FLAG_GOAL,
        },
    }


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = [
        "# Probing detection (issue 12, part 2)", "",
        f"Embedding: `{doc['embedding_choice']['chosen']}`; threshold {s['threshold']} (k = {s['k']}, "
        f"min {MIN_QUERIES} previous queries, history {HISTORY}), chosen on the corpus dev part "
        f"({doc['threshold']['dev']['clients']} clients x {doc['threshold']['dev']['queries']} queries).",
        "",
        "Sidecar: images the client sent up to and including the call answered with advsentry_probing=true "
        "(its clean-label call included; a batched call of up to 8 images counts whole, since its answer "
        "comes at once; the next call is refused). Offline: per image, the attack's own queries. 'None': "
        "never detected (the attack was over first). 'first fooled' is the first answer with another class; "
        "for HopSkipJump and boundary that is their noise starting point, not a small perturbation.",
        "",
        "| attack | queries until detection, sidecar (reject) | offline, full streams | median | worst | "
        "median queries-to-success, measured (images fooled within budget) | sidecar run's own success (Square) | "
        "offline: first fooled answer | offline: queries sent | detected in time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in s["attacks"].items():
        fooled = round(a["queries_to_success_share"] * a["queries_to_success_images"])
        lines.append(f"| {name} | {a['detection_sidecar']} | {a['detection_offline']} | {a['median_detection']} | "
                     f"{a['worst_detection']} | {a['queries_to_success_goal']} ({fooled}/"
                     f"{a['queries_to_success_images']}) | {a['own_success_sidecar']} | "
                     f"{a['first_fooled_offline']} | {a['queries_sent_offline']} | "
                     f"{a['runs_detected_in_time']}/{a['runs']} |")
    q = doc["queries_to_success"]
    lines += [
        "", f"Median queries-to-success (the reference above), measured by this run: each attack, with the "
        f"parameters above and no detector, on {len(q['images'])} {q['selection']}; per image, the queries "
        "(images sent to the model, counted as for detection) until the first answer of another class to a "
        "query within the attack's budget. Square: within eps (every Square query is); one-pixel: one pixel "
        "changed (every query is); HopSkipJump and boundary have no budget and their first fooled answer is "
        "their noise starting point, so they count from the first fooled query within the L2 size of a full "
        f"{DECISION_SUCCESS_LINF * 255:.0f}/255 L-infinity perturbation. The median is over the fooled images; "
        "an attack that fooled none has no success to come first. 'None': not fooled within budget before "
        "the attack ended.", "",
        "| attack | success means | images fooled within budget | median | per image | first fooled answer "
        "(any size) | queries sent |", "|---|---|---|---|---|---|---|",
    ]
    for name, r in q["attacks"].items():
        budget = r["budget"]
        lines.append(f"| {name} | {budget['norm']} <= {budget['bound']:.4g} | {r['successes']}/{r['images']} "
                     f"({r['success_share']:.0%}) | {r['median']} | {r['queries_until_success']} | "
                     f"{r['first_fooled']} | {r['queries_sent']} |")
    ct, dev = doc["clean_test"], doc["threshold"]["dev"]
    lines += [
        "", "| clean clients | clients | queries each | flagged | share |", "|---|---|---|---|---|",
        f"| dev (threshold chosen here) | {dev['clients']} | {dev['queries']} | {dev['flagged']} | "
        f"{dev['flagged_share']:.4%} |",
        f"| test | {ct['clients']} | {ct['queries']} | {ct['flagged']} | {ct['flagged_share']:.4%} |",
        "", f"Benign video burst ({doc['video']['frames']} frames, one client): flagged after "
        f"{doc['video']['queries_until_detection']} frames (expected: allow-list such clients).",
        "", "| embedding candidate | clean dev client min distance (1 % quantile) | attack median kNN distance | gap |",
        "|---|---|---|---|",
    ]
    for name, row in doc["embedding_choice"]["candidates"].items():
        lines.append(f"| {name} | {row['clean_q01']:.4f} | {row['attack_median']:.4f} | {row['gap']:.1f}x |")
    lines += ["", "| k | dev: client min distance 0.1 % quantile | threshold | test flagged share |", "|---|---|---|---|"]
    for k, row in doc["threshold"]["sweep"].items():
        lines.append(f"| {k} | {row['q001']:.4f} | {row['threshold']} | {row['test_flagged_share']:.4%} |")
    lines += ["", "| history | observe() median | p99 | bytes per client |", "|---|---|---|---|"]
    for history, row in doc["cost"].items():
        lines.append(f"| {history} | {row['median_us']:.0f} µs | {row['p99_us']:.0f} µs | {row['bytes_per_client']} |")
    g = s["goals"]
    lines += ["", f"Goals: every attack detected before its median query-to-success: {g['every_attack_before_success']}; "
              f"median detection ≤ 10 queries: {g['median_detection_le_10']} (median {s['median_detection']}); "
              f"≤ 0.1 % of clean clients flagged: {g['clean_flagged_le_0.1%']}.", ""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="bundled photos, tiny attacks, no sidecar (seconds)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--fresh", action="store_true", help="recompute every stage")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--images", type=int, default=4, help="bundled photos attacked per attack (offline)")
    parser.add_argument("--sidecar-images", type=int, default=2, help="of those, attacked through the sidecar")
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "probing")
    parser.add_argument("--feature-subsample", type=int, default=160, help="dev images embedded by the model")
    parser.add_argument("--no-sidecar", action="store_true")
    parser.add_argument("--reference-images", type=int, default=16,
                        help="corpus dev images (one per source) each attack runs on, undefended, for its median "
                             "queries-to-success")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    name = "probing_smoke" if args.smoke else "probing"
    path = args.results_dir / f"{name}.json"
    doc: dict[str, Any] = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    streams_cache = args.cache / f"{name}_streams.npz"

    def save() -> None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        doc.update(benchmark=name, machine=machine(), load_average=load_average(),
                   created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        path.write_text(json.dumps(doc, indent=2, default=float) + "\n")

    from detector.embedding import embed
    from detector.models import load_bundled_model
    from detector.samples import full_photo_samples, to_tensor

    model = load_bundled_model()
    feature = FeatureEmbedder(model)
    photos = to_tensor([s.pixels() for s in full_photo_samples()])
    attacked = photos[1:1 + (1 if args.smoke else args.images)]
    clients = 20 if args.smoke else args.clients
    queries = 8 if args.smoke else args.queries

    # Clean embeddings: the corpus (dev/test) or, for smoke, the bundled photos.
    if args.smoke:
        dev_pixels = test_pixels = _smoke_images()
        dev_ids = dev_sources = [f"smoke-{i}" for i in range(len(dev_pixels))]
    else:
        from detector.corpus import load_corpus

        corpus = load_corpus()
        dev_pixels, dev_sources = _clean_pixels(corpus.split("dev"))
        dev_ids = [image.id for image in corpus.split("dev")]
        test_pixels, _ = _clean_pixels(corpus.split("test"))
    dev = embed(dev_pixels)
    test = embed(test_pixels)

    # 1. offline attack streams (cached: they are the slow part)
    streams: dict[str, Any] = {}
    if streams_cache.exists() and not args.fresh and "attacks_offline" in doc:
        streams = np.load(streams_cache, allow_pickle=True)["streams"].item()
    new = record_attack_streams(model, feature, attacked, SMOKE_ATTACKS if args.smoke else ATTACKS, done=set(streams))
    if new or "attacks_offline" not in doc:
        print(f"attacks offline: {len(new)} new streams", flush=True)
        streams.update(new)
        args.cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(streams_cache, streams=np.array(streams, dtype=object))
        doc["attacks_offline"] = {key: {k: v for k, v in s.items() if k not in ("pixels", "features", "fooled")}
                                  | {"queries_sent": int(len(s["pixels"])), "first_fooled": _first_fooled(s)}
                                  for key, s in streams.items()}
        save()

    # 2. embedding choice (kNN distances of clean dev clients vs attack streams)
    if "embedding_choice" not in doc:
        print("embedding choice ...", flush=True)
        subset = np.random.default_rng(1).permutation(len(dev_pixels))[:args.feature_subsample]
        subset.sort()
        candidates = {"pixels16_proj64": dev[subset], "penultimate_proj64": feature.embed(dev_pixels[subset])}
        rows = {}
        for cand, clean in candidates.items():
            key = "pixels" if cand.startswith("pixels") else "features"
            sim = simulate_clients(clean, clients=min(clients, 300), queries=queries, k=DEFAULT_K,
                                   threshold=1e-9, seed=2)
            attack = [stream_detection(s[key], threshold=1e-9, k=DEFAULT_K)["median_distance"]
                      for s in streams.values()]
            attack_median = float(np.median([a for a in attack if a is not None]))
            rows[cand] = {"clean_q01": sim["client_min_distance"]["0.01"], "attack_median": attack_median,
                          "gap": sim["client_min_distance"]["0.01"] / max(attack_median, 1e-9),
                          "images": int(len(clean))}
        chosen = max(rows, key=lambda c: rows[c]["gap"])
        doc["embedding_choice"] = {"candidates": rows, "chosen": chosen,
                                   "served": "pixels16_proj64",
                                   "note": "the served embedding is detector.embedding (pixels16_proj64)"}
        save()

    # 3. threshold on dev (k sweep), 4. clean test
    if "threshold" not in doc or "clean_test" not in doc:
        print("threshold ...", flush=True)
        sweep = {}
        for k in K_SWEEP:
            sim = simulate_clients(dev, clients=clients, queries=queries, k=k, threshold=1e-9, seed=3)
            threshold = choose_threshold(sim["client_min_distance"]["0.001"])
            dev_run = simulate_clients(dev, clients=clients, queries=queries, k=k, threshold=threshold, seed=3)
            test_run = simulate_clients(test, clients=clients, queries=queries, k=k, threshold=threshold, seed=4)
            sweep[str(k)] = {"q001": sim["client_min_distance"]["0.001"], "threshold": threshold,
                             "dev": dev_run, "test_flagged_share": test_run["flagged_share"], "test": test_run}
        chosen = sweep[str(DEFAULT_K)]
        doc["threshold"] = {"k": DEFAULT_K, "chosen": chosen["threshold"], "dev": chosen["dev"],
                            "rule": "half the 0.1 % quantile of dev clients' smallest kNN distance",
                            "sweep": {k: {kk: vv for kk, vv in v.items() if kk not in ("dev", "test")}
                                      for k, v in sweep.items()}}
        doc["clean_test"] = chosen["test"]
        save()
    threshold, k = doc["threshold"]["chosen"], doc["threshold"]["k"]

    # 5. video burst
    if "video" not in doc:
        frames = video_frames(photos[4:5], count=30)
        detection = stream_detection(embed(frames), threshold=threshold, k=k)
        doc["video"] = {"frames": 30, **detection}
        save()

    # 6. offline streams through the detector
    doc["attacks_offline_detection"] = {
        key: {"attack": s["attack"], "image": s["image"], "queries_sent": int(len(s["pixels"])),
              "queries_until_fooled": _first_fooled(s), "attack_queries": s["attack_queries"],
              "success": s["success"], **stream_detection(s["pixels"], threshold=threshold, k=k)}
        for key, s in streams.items()}
    save()

    # 7. through the real sidecar
    if not args.smoke and not args.no_sidecar:
        import tempfile

        print("sidecar ...", flush=True)
        doc.setdefault("sidecar", {})
        with tempfile.TemporaryDirectory() as workdir:
            sidecar_runs(attacked[:args.sidecar_images], ATTACKS, threshold, k, Path(workdir), doc["sidecar"], save)
        save()

    # 8. cost
    if "cost" not in doc:
        doc["cost"] = observe_cost()

    # 9. the reference: median queries-to-success of each undefended attack, on dev images
    chosen = reference_images(dev_sources, 2 if args.smoke else args.reference_images, seed=5)
    reference_ids = [dev_ids[i] for i in chosen]
    attacks = SMOKE_ATTACKS if args.smoke else ATTACKS
    q = doc.setdefault("queries_to_success", {})
    q.update(images=reference_ids, selection="bundled photos, mirrors and crops (smoke)" if args.smoke else
             "corpus dev images, one per source (seeded)")
    runs = q.setdefault("runs", {})
    print(f"queries-to-success on {len(reference_ids)} dev images ...", flush=True)
    measure_queries_to_success(model, dev_pixels[chosen], reference_ids, attacks, runs, save)
    wanted = {f"{name}/{image_id}" for name in attacks for image_id in reference_ids}
    q["runs"] = {key: row for key, row in runs.items() if key in wanted}  # drop images no longer chosen
    q["attacks"] = reference_summary(q["runs"], attacks, reference_ids)
    doc["summary"] = summarize(doc)
    save()
    (args.results_dir / f"{name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
