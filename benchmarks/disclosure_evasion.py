"""Score-guided black-box evasion with disclosure ``score`` vs ``verdict`` (issue 13).

``python -m benchmarks.disclosure_evasion [--smoke] [--count N] [--budget Q]``

(defaults: 10 inputs, 160 queries each in rounds of 8 concurrent calls;
every query is a Lite0 forward plus the default detector's signals in
Triton's Python backend; ``--minutes`` stops starting new inputs, a rerun
continues where the last one stopped)

What a disclosed score is worth to an attacker, measured through the product:
the bundled EfficientNet-Lite0 exported with the shipped default detector's
signals, a real ``tritonserver``, and two ``advsentry serve`` processes in
front of it (policy annotate, the shipped default calibration), one with
``--disclosure score`` and one with ``--disclosure verdict`` (the default).

- **Inputs**: corpus *test* inputs when the corpus is installed (one per
  source, seeded order), else the bundled photos; ``--smoke``: one photo.
- **Starting point**: the attacker already has an adversarial input that the
  sidecar flags: PGD (L∞, 10 steps, on the same weights, 8-bit) at the
  smallest of 2, 4, 8, 16 /255 that changes the top-1 class and is flagged
  (checked through the verdict sidecar, not counted as attack queries);
  inputs with none are skipped (counted).
- **Search** (the same proposal generator in both modes, seeded per input):
  rounds of 8 Square-attack style coordinate steps inside the L∞ ball of
  radius max(``--eps`` (default 8/255), the start's eps) around the clean
  image: a random square (side shrinking with the queries) of one channel is
  set to clean ± eps or put back to clean, 8-bit. A proposal must stay
  adversarial (top-1 ≠ the clean label; the logits are the model output every
  client gets). With ``score`` the round's lowest-scoring proposal is accepted
  when ``advsentry_score`` drops (hill climbing on the disclosed score); with
  ``verdict`` only the binary flag is disclosed, so nothing is accepted until
  a step flips to clean (no gradient to follow). Success: a response with ``advsentry_adversarial``
  false and a changed top-1, within ``--budget`` queries.
- **Reported**: success rate and queries to success (median, quartiles) per
  mode, and every input's trace summary.

Resumable: each (mode, input) result is appended to
``benchmarks/results/disclosure_evasion.partial.json`` and skipped on rerun
with the same settings. Writes ``disclosure_evasion.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .common import RESULTS_DIR, SidecarProcess, load_average, machine, write_result

MODEL = "efficientnet-lite0"
MODES = ("score", "verdict")


@dataclass(frozen=True)
class EvasionSettings:
    count: int = 10
    budget: int = 160
    round_size: int = 8
    minutes: float = 40.0
    eps: float = 8 / 255
    start_eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255)
    seed: int = 0
    smoke: bool = False

    def key(self) -> str:
        fixed = {k: v for k, v in asdict(self).items() if k not in ("minutes", "count")}  # a rerun may extend these
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


def load_inputs(settings: EvasionSettings) -> list[tuple[str, np.ndarray]]:
    """``(id, float32 [1, 3, 224, 224] in [0, 1])`` clean inputs (see the module docstring)."""
    from detector.samples import full_photo_samples, to_tensor

    if not settings.smoke:
        from detector.corpus import corpus_installed, load_corpus

        if corpus_installed():
            rng = np.random.default_rng(settings.seed)
            by_source: dict[str, Any] = {}
            for image in load_corpus().split("test"):
                by_source.setdefault(image.source, image)
            sources = sorted(by_source)
            order = rng.permutation(len(sources))
            picked = [by_source[sources[i]] for i in order[: settings.count]]
            return [(image.id, to_tensor([image.pixels()]).numpy()) for image in picked]
    photos = full_photo_samples()[: settings.count]
    return [(photo.name, to_tensor([photo.pixels()]).numpy()) for photo in photos]


def pgd(model, clean: np.ndarray, label: int, eps: float, steps: int = 10) -> np.ndarray:
    """Untargeted L∞ PGD on the local copy of the weights, rounded to 8 bits."""
    import torch

    x0 = torch.from_numpy(clean)
    x = x0.clone()
    step = eps / 4
    target = torch.tensor([label])
    for _ in range(steps):
        x.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        (grad,) = torch.autograd.grad(loss, x)
        x = (x.detach() + step * grad.sign()).clamp(x0 - eps, x0 + eps).clamp(0, 1)
    return quantize(x.numpy(), clean, eps)


def quantize(x: np.ndarray, clean: np.ndarray, eps: float) -> np.ndarray:
    """8-bit pixels that stay inside the L∞ ball (rounding never leaves it)."""
    low = np.ceil(np.clip(clean - eps, 0, 1) * 255 - 1e-6) / 255
    high = np.floor(np.clip(clean + eps, 0, 1) * 255 + 1e-6) / 255
    return np.clip(np.round(x * 255) / 255, low, high).astype(np.float32)


def _starting_point(model, clean: np.ndarray, label: int, settings: EvasionSettings,
                    address: str) -> tuple[np.ndarray | None, float | None]:
    """The smallest-eps PGD adversarial that the sidecar flags: ``(start, eps)``; ``(adv, None)``: none
    flagged (nothing to evade); ``(None, None)``: PGD found no adversarial. Not counted as attack queries:
    the attacker is given a flagged adversarial to begin with."""
    import torch

    found = None
    oracle = Oracle(address)
    try:
        for eps in settings.start_eps:
            candidate = pgd(model, clean, label, eps)
            with torch.no_grad():
                if int(model(torch.from_numpy(candidate)).argmax()) == label:
                    continue
            found = candidate
            top1, params = oracle(candidate)
            if top1 != label and params.get("advsentry_adversarial"):
                return candidate, eps
    finally:
        oracle.close()
    return found, None


class Oracle:
    """One attacker's view of a sidecar: logits and whatever advsentry parameters the response carries."""

    def __init__(self, address: str) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.queries = 0
        self.retries = 0

    def __call__(self, pixels: np.ndarray) -> tuple[int, dict[str, Any]]:
        from tritonclient.grpc import service_pb2

        request = service_pb2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
        request.outputs.add(name="logits")
        request.raw_input_contents.append(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
        import grpc

        for attempt in range(4):  # a loaded machine can time a call out: retried, counted once
            try:
                response = self.stub.ModelInfer(request, timeout=300)
                break
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE) or attempt == 3:
                    raise
                self.retries += 1
        self.queries += 1
        logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
        return int(logits.argmax()), params

    def many(self, batch: list[np.ndarray]) -> list[tuple[int, dict[str, Any]]]:
        """One round: the proposals sent as concurrent single-image calls (Triton's dynamic batcher
        batches them); every image is one query and gets its own answer."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(batch)) as pool:
            return list(pool.map(self, batch))

    def close(self) -> None:
        self.channel.close()


def _propose(rng: np.random.Generator, current: np.ndarray, clean: np.ndarray, eps: float,
             progress: float) -> np.ndarray:
    """One Square-style step: a random square of one channel set to clean ± eps, or put back to clean."""
    _, channels, height, width = clean.shape
    fraction = max(0.01, 0.1 * (1 - progress))  # Square's shrinking square
    side = max(1, int(round(np.sqrt(fraction * height * width))))
    row, col = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    channel = rng.integers(0, channels)
    proposal = current.copy()
    patch = (0, channel, slice(row, row + side), slice(col, col + side))
    if rng.random() < 0.5:
        proposal[patch] = clean[patch]  # shrink the perturbation there
    else:
        proposal[patch] = clean[patch] + rng.choice((-1.0, 1.0)) * eps
    return quantize(proposal, clean, eps)


def evade(oracle: Oracle, mode: str, clean: np.ndarray, start: np.ndarray, label: int, settings: EvasionSettings,
          seed: int) -> dict[str, Any]:
    """The random search of the module docstring; returns success, queries and the score trace (score mode)."""
    rng = np.random.default_rng(seed)
    current = start.copy()
    top1, params = oracle(current)
    queries = 1
    if top1 == label:
        return {"status": "not_adversarial_remotely", "queries": queries}
    if not params.get("advsentry_adversarial", False):
        return {"status": "not_flagged", "queries": queries}
    score = params.get("advsentry_score") if mode == "score" else None
    first_score = score
    accepted = 0
    while queries < settings.budget:
        size = min(settings.round_size, settings.budget - queries)
        proposals = [_propose(rng, current, clean, settings.eps, queries / settings.budget) for _ in range(size)]
        answers = oracle.many(proposals)
        best = None
        for position, (proposal, (top1, params)) in enumerate(zip(proposals, answers)):
            if top1 == label:
                continue  # no longer adversarial: useless to the attacker
            if not params.get("advsentry_adversarial", True):
                return {"status": "evaded", "queries": queries + position + 1, "accepted": accepted,
                        "linf_255": round(float(np.abs(proposal - clean).max()) * 255, 2),
                        "first_score": first_score, "final_score": params.get("advsentry_score")}
            if mode == "score" and (best is None or params["advsentry_score"] < best[0]):
                best = (params["advsentry_score"], proposal)
        queries += size
        if best is not None and best[0] < score:  # score disclosure only: hill-climb on the score
            score, current, accepted = best[0], best[1], accepted + 1
    return {"status": "budget_exhausted", "queries": queries, "accepted": accepted,
            "first_score": first_score, "final_score": score}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    attacked = [r for r in rows if r["status"] in ("evaded", "budget_exhausted")]
    evaded = [r for r in attacked if r["status"] == "evaded"]
    queries = sorted(r["queries"] for r in evaded)

    def quartile(q: float) -> float | None:
        return float(np.quantile(queries, q)) if queries else None

    return {
        "attacked": len(attacked),
        "evaded": len(evaded),
        "success_rate": len(evaded) / len(attacked) if attacked else None,
        "queries_median": statistics.median(queries) if queries else None,
        "queries_q1": quartile(0.25),
        "queries_q3": quartile(0.75),
        "skipped": {status: sum(r["status"] == status for r in rows)
                    for status in ("no_start", "not_flagged", "not_adversarial_remotely")},
    }


def run(settings: EvasionSettings, results_dir: Path, report_only: bool = False) -> dict[str, Any]:
    import torch

    from detector.detector import DEFAULT_ARTIFACT_PATH
    from detector.models import load_bundled_model
    from service.triton.export import export_model_repository
    from service.triton.server import TritonServer

    name = "disclosure_evasion_smoke" if settings.smoke else "disclosure_evasion"
    partial_path = results_dir / f"{name}.partial.json"
    done: dict[str, Any] = {}
    if partial_path.is_file():
        stored = json.loads(partial_path.read_text())
        if stored.get("settings_key") == settings.key():
            done = stored["rows"]
    model = load_bundled_model().eval()
    inputs = load_inputs(settings)
    started = time.time()
    load_start = load_average()
    if report_only:  # the JSON and table from the rows already measured, no Triton
        inputs = []
    with tempfile.TemporaryDirectory(prefix="advsentry-evasion-") as workdir:
        if not inputs:
            return _finish(settings, results_dir, name, done, started, load_start)
        export_model_repository(Path(workdir) / "repo")
        with TritonServer(Path(workdir) / "repo") as triton:
            sidecars = {mode: SidecarProcess(triton.grpc_address, args=(
                "--policy", "annotate", "--calibration", str(DEFAULT_ARTIFACT_PATH), "--disclosure", mode,
                "--max-in-flight-per-client", "0", "--upstream-timeout-s", "240")) for mode in MODES}
            for sidecar in sidecars.values():
                sidecar.__enter__()
            try:
                for index, (input_id, clean) in enumerate(inputs):
                    if time.time() - started > settings.minutes * 60:
                        print(f"--minutes {settings.minutes} reached: {index} of {len(inputs)} inputs attempted",
                              flush=True)
                        break
                    with torch.no_grad():
                        label = int(model(torch.from_numpy(clean)).argmax())
                    start, start_eps = None, None
                    if any(f"{mode}:{input_id}" not in done for mode in MODES):
                        start, start_eps = _starting_point(model, clean, label, settings, sidecars["verdict"].address)
                    for mode in MODES:
                        key = f"{mode}:{input_id}"
                        if key in done:
                            continue
                        if start is None:
                            row: dict[str, Any] = {"status": "no_start", "queries": 0}
                        elif start_eps is None:
                            row = {"status": "not_flagged", "queries": 0}
                        else:
                            oracle = Oracle(sidecars[mode].address)
                            t0 = time.perf_counter()
                            ball = replace(settings, eps=max(settings.eps, start_eps))
                            row = evade(oracle, mode, clean, start, label, ball, settings.seed * 1000 + index)
                            row["seconds"] = round(time.perf_counter() - t0, 2)
                            oracle.close()
                        row.update({"input": input_id, "mode": mode,
                                    "start_eps_255": round(start_eps * 255) if start_eps else None})
                        done[key] = row
                        print(f"{key}: {row}", flush=True)
                        results_dir.mkdir(parents=True, exist_ok=True)
                        partial_path.write_text(json.dumps({"settings_key": settings.key(), "rows": done}, indent=1))
            finally:
                for sidecar in sidecars.values():
                    sidecar.__exit__(None, None, None)
    return _finish(settings, results_dir, name, done, started, load_start)


def _finish(settings: EvasionSettings, results_dir: Path, name: str, done: dict[str, Any], started: float,
            load_start: list[float]) -> dict[str, Any]:
    rows = list(done.values())
    result = {
        "settings": {**asdict(settings), "eps_255": round(settings.eps * 255, 3),
                     "start_eps_255": [round(e * 255, 3) for e in settings.start_eps]},
        "machine": machine(),
        "wall_s": round(time.time() - started, 1),
        "load_average_start": load_start,
        "load_average": load_average(),
        "modes": {mode: _summary([r for r in rows if r["mode"] == mode]) for mode in MODES},
        "rows": rows,
    }
    write_result(name, result, results_dir)
    (results_dir / f"{name}.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Score-guided evasion: disclosure `score` vs `verdict`",
        "",
        f"Through a real Triton + `advsentry serve` (policy annotate, shipped default calibration). "
        f"Start: an adversarial input (PGD, 8-bit) the sidecar flags; search: Square-style steps in the "
        f"L∞ ball of {s['eps_255']}/255 around the clean input, budget {s['budget']} queries; success: "
        f"still misclassified and not flagged. `python -m benchmarks.disclosure_evasion`.",
        "",
        "| disclosure | attacked | evaded | success rate | queries to success (median [q1, q3]) |",
        "|---|---|---|---|---|",
    ]
    for mode, summary in result["modes"].items():
        rate = "–" if summary["success_rate"] is None else f"{summary['success_rate']:.0%}"
        queries = ("–" if summary["queries_median"] is None else
                   f"{summary['queries_median']:.0f} [{summary['queries_q1']:.0f}, {summary['queries_q3']:.0f}]")
        lines.append(f"| {mode} | {summary['attacked']} | {summary['evaded']} | {rate} | {queries} |")
    skipped = result["modes"][MODES[0]]["skipped"]
    lines += ["", f"Skipped inputs (same for both modes): {skipped} (no_start: PGD found no adversarial; "
                  "not_flagged: the start already passes, nothing to evade).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one photo, a 6-query budget (checks the pipeline)")
    parser.add_argument("--count", type=int, default=EvasionSettings.count)
    parser.add_argument("--budget", type=int, default=EvasionSettings.budget)
    parser.add_argument("--eps", type=float, default=8.0, help="L∞ budget around the clean input, in /255")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true",
                        help="write the JSON and table from the rows measured so far (no Triton)")
    parser.add_argument("--minutes", type=float, default=EvasionSettings.minutes,
                        help="start no new input after this long (rerun to continue: results are kept)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    settings = EvasionSettings(count=1 if args.smoke else args.count, budget=6 if args.smoke else args.budget,
                               eps=args.eps / 255, seed=args.seed, smoke=args.smoke, minutes=args.minutes)
    result = run(settings, args.results_dir, report_only=args.report_only)
    print(markdown(result))


if __name__ == "__main__":
    main()
