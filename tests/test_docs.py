"""The README and docs/ against the repository: quoted results, cited paths, documented names.

- Every result number quoted in README.md and docs/*.md is a row of :data:`QUOTES`: the page, the
  exact text around the number (whitespace-normalized, so line wrapping does not matter), the
  number as written, the committed results file it comes from, where in that file (a ``/``-separated
  JSON path or a function of the parsed file) and how it is rounded. The test reads the real files,
  so a rerun benchmark that moves a number, or an edit of a page, fails here until both agree.
- Every relative link, and every repository path in inline code or code blocks, exists (links to
  headings of a Markdown page must name an existing heading).
- Names the pages document exist in the code: every alert of the Prometheus rules, every metric of
  ``service/metrics.py`` and the hooks' modules and every setting of ``service/settings.py`` is in docs/operations.md, and
  no page names an alert, or a module path, that no longer exists.
- README.md stays a front door (< 300 lines); the old DESIGN.md citations point at the docs section
  that now holds what they relied on.
"""

from __future__ import annotations

import ast
import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
EXPECTED_PAGES = {"docs/architecture.md", "docs/detection.md", "docs/calibration.md", "docs/operations.md",
                  "docs/security.md", "docs/explain.md", "docs/benchmarks.md", "docs/own-model.md"}

R = "benchmarks/results/"
STUDY = R + "corpus_study_learned/results.json"  # the shipped default's study
PREVIOUS_STUDY = R + "corpus_study/results.json"  # fixed-signals
CONF03 = R + "corpus_study_conf03/results.json"
BLACKBOX = R + "corpus_study_learned/blackbox.json"
CORPUS = R + "corpus/summary.json"
COST = R + "detection_cost.json"
PROXY = R + "proxy_overhead.json"
MEMORY = R + "sidecar_memory.json"
KERNEL = R + "entropy_kernel_cpu.json"
PROBING = R + "probing.json"
TRAFFIC = R + "traffic_calibration.json"
DISCLOSURE = R + "disclosure_evasion.json"
FUZZ = R + "fuzz.json"
SOAK = R + "fault_soak.json"
EXPLAIN = R + "explain_sample/explanation.json"
PROBE = R + "probe_sample/corpus_dev/probe.json"
BUNDLED = "docs/results/bundled_scores.json"
OWN = R + "own_model/lite2_smoke_calibration.json"
LITE2 = R + "own_model/lite2_calibration.json"
LITE2_UP = R + "own_model/lite2_260_upscaled_calibration.json"
LITE2_TIME = R + "own_model/lite2_timings.json"
#: docs/own-model.md's Lite2 table: (row label, attack label, Lite2 cell, bundled cell)
LITE2_TABLE = (
    ("FGSM 2/255", "fgsm", "0.883 [0.84, 0.92]", "0.932 [0.90, 0.96]"),
    ("PGD L∞ 2/255", "pgd_2", "0.956 [0.92, 0.98]", "0.992 [0.98, 1.00]"),
    ("DeepFool", "deepfool", "0.875 [0.81, 0.92]", "0.934 [0.89, 0.96]"),
    ("Square 4/255 (unseen)", "square_4", "0.909 [0.86, 0.95]", "0.955 [0.93, 0.98]"),
)


def _auc_cell(attack: str, cell: str) -> list[tuple[str, str, Callable[[Any], str]]]:
    """The three numbers of an ``AUC [low, high]`` table cell, against a calibration's by-source AUC."""
    value, low, high = cell.replace("[", "").replace(",", "").replace("]", "").split()
    base = f"results/attacks/{attack}/auc_by_source/"
    return [(value, base + "value", dec(3)), (low, base + "low", dec(2)), (high, base + "high", dec(2))]
BB = R + "blackbox/blackbox_detector.json"
BB_DEFAULT = R + "blackbox/default_same_images.json"
BB_COST = R + "blackbox_cost.json"
BB_SQ = R + "blackbox_squeeze/blackbox_squeeze_detector.json"
BB_EXPORTED = R + "blackbox_squeeze/default_refit.json"
#: docs/detection.md's black-box table: (row label, attack label, cells for blackbox-squeeze, blackbox, exported)
BB_TABLE = (
    ("FGSM 2/255 (124)", "fgsm", ("0.866 [0.82, 0.91]", "0.791 [0.73, 0.84]", "0.932 [0.90, 0.96]")),
    ("FGSM 8/255 (128)", "fgsm_8", ("0.923 [0.88, 0.96]", "0.921 [0.88, 0.96]", "0.984 [0.97, 0.99]")),
    ("PGD L∞ 2/255 (65)", "pgd_2", ("0.870 [0.79, 0.93]", "–", "0.992 [0.98, 1.00]")),
    ("DeepFool (65)", "deepfool", ("0.905 [0.86, 0.95]", "–", "0.934 [0.89, 0.96]")),
    ("Square L∞ 4/255, unseen (46)", "square_4", ("0.830 [0.76, 0.88]", "–", "0.955 [0.93, 0.98]")),
    ("C&W L2, unseen (14)", "cw_l2", ("0.884 [0.80, 0.95]", "–", "–")),
)
OWN_TIMES = R + "own_model/timings.json"


# ---- reading the results ----------------------------------------------------------------------------

@cache
def load(path: str) -> Any:
    return json.loads((ROOT / path).read_text(encoding="utf-8"))


def at(data: Any, path: str) -> Any:
    """``a/b/0/c`` into nested dicts and lists (keys may contain dots, e.g. ``0.05``)."""
    for part in path.split("/"):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


@cache
def page(path: str) -> str:
    return " ".join((ROOT / path).read_text(encoding="utf-8").split())


# ---- rounding ---------------------------------------------------------------------------------------

def dec(n: int) -> Callable[[float], str]:
    """``n`` decimals; a negative value with the typographic minus the pages use."""
    return lambda v: f"{v:.{n}f}".replace("-", "−")


def pct(n: int) -> Callable[[float], str]:
    """A share as percent with ``n`` decimals."""
    return lambda v: f"{100 * v:.{n}f}"


def count(v: float) -> str:
    """An integer with thousands separators (1,081)."""
    return f"{int(round(v)):,}"


def text(v: Any) -> str:
    """Identifiers and dates: the value itself (matched as a substring, not as a number)."""
    return str(v)


def day(v: str) -> str:
    return v[:10]


# ---- values computed from a results file --------------------------------------------------------------

def judged(study: dict, detector: str = "chosen") -> dict[str, dict]:
    """The attacks with enough successful adversarials to judge (≥ 10, as the goals table does)."""
    return {a: row for a, row in study["test"][detector].items() if row["adversarial"] >= 10}


def auc_span(detector: str, *, only_judged: bool, end: int) -> Callable[[dict], float]:
    def value(study: dict) -> float:
        rows = judged(study, detector) if only_judged else study["test"][detector]
        aucs = sorted(row["auc"]["value"] for row in rows.values())
        return aucs[end]
    return value


def tpr1_span(attacks: tuple[str, ...], end: int) -> Callable[[dict], float]:
    return lambda study: sorted(study["test"]["chosen"][a]["tpr"]["0.01"]["value"] for a in attacks)[end]


WEAK = ("fgsm_2", "gradient_l2", "deepfool", "cw_l2", "square")  # the "others" of the TPR@1 % line


def adaptive_plain_pgd(end: int) -> Callable[[dict], float]:
    """Share correct or flagged under PGD without the detector term (λ = 0), min or max over ε."""
    return lambda study: sorted(r["correct_or_flagged"] for r in study["adaptive"]["rows"] if r["weight"] == 0)[end]


def adaptive_worst(study: dict) -> float:
    """Most inputs correct or flagged over ε at λ ≥ 1 (the doc says 0 of 12 at every ε)."""
    rows = [r for r in study["adaptive"]["rows"] if r["weight"] > 0]
    return max(r["correct_or_flagged"] * r["n"] for r in rows)


def proxy_span(model: str, comparison: str, end: int) -> Callable[[dict], float]:
    def value(doc: dict) -> float:
        return sorted(r[comparison]["throughput_ratio"] for r in doc[model]["rows"] if comparison in r)[end]
    return value


def proxy_c1(comparison: str, mode: str) -> Callable[[dict], float]:
    def value(doc: dict) -> float:
        (row,) = [r for r in doc["identity"]["rows"] if r["concurrency"] == 1 and r["mode"] == mode]
        return row[comparison]["added_p50_ms"]
    return value


def signals_vs_maps(end: int) -> Callable[[dict], float]:
    """Requests/s of the signals path over the maps path, per cell, min or max."""
    def value(doc: dict) -> float:
        ratios = [r["sidecar"]["throughput_rps"]["median"] / r["sidecar_maps"]["throughput_rps"]["median"]
                  for r in doc["identity"]["rows"]]
        return sorted(ratios)[end]
    return value


def traffic(scenario: str, share: float, target: float, trim: float, key: str = "fpr") -> Callable[[dict], float]:
    def value(doc: dict) -> float:
        (row,) = [r for r in doc["scenarios"][scenario]["rows"]
                  if (r["adversarial_share"], r["target_fpr"], r["trim"]) == (share, target, trim)]
        return row["realized_fpr"]["value"] if key == "fpr" else row["test_tpr_median"]
    return value


def sketch_error(doc: dict) -> float:
    return max(r["sketch_vs_exact_max_relative"] for s in doc["scenarios"].values() for r in s["rows"])


def calibration_in(path: str) -> Callable[[dict], str]:
    return lambda doc: re.search(r"cal-[0-9a-f]{12}", at(doc, path)).group(0)


def sidecar_detection(attack: str) -> Callable[[dict], float]:
    return lambda doc: doc["summary"]["attacks"][attack]["median_detection"]


def offline_detection(end: int) -> Callable[[dict], float]:
    """Offline per-image detection of HopSkipJump, boundary and one-pixel: min or max query."""
    def value(doc: dict) -> float:
        found = [q for a in ("hopskipjump", "boundary", "one_pixel")
                 for q in doc["summary"]["attacks"][a]["detection_offline"] if q is not None]
        return sorted(found)[end]
    return value


def fooled_first(attack: str) -> Callable[[dict], float]:
    """Photos fooled by the attack's first perturbed query (first fooled answer = query 2)."""
    return lambda doc: sum(q == 2 for q in doc["summary"]["attacks"][attack]["first_fooled_offline"])


def probe_auc(attack: str, probe: str, key: str) -> Callable[[dict], float]:
    return lambda doc: doc["attacks"][attack]["auc"][probe][key]


def probe_median(group: str, probe: str) -> Callable[[dict], float]:
    return lambda doc: doc["summary"][group][probe]["median"]


def corpus_at_least(floor: float) -> Callable[[dict], float]:
    """Candidates the confidence histogram puts at or above ``floor``."""
    return lambda doc: sum(n for band, n in doc["stats"]["confidence_histogram"]["all"].items()
                           if float(band.split("-")[0]) >= floor)


def bundled_row(run: str, image: str, key: str) -> Callable[[dict], Any]:
    return lambda doc: next(r[key] for r in doc["runs"][run]["rows"] if r["image"] == image)


def cost_row(batch: int, key: str) -> Callable[[dict], float]:
    return lambda doc: next(r[key] for r in doc["rows"] if r["batch"] == batch)


def kernel_row(batch: int, key: str) -> Callable[[dict], float]:
    return lambda doc: next(r[key] for r in doc["rows"] if r["batch"] == batch)


def kernel_max_error(doc: dict) -> float:
    return max(r["max_abs_error"] for r in doc["rows"])


# ---- the table --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quote:
    doc: str  # page
    snippet: str  # exact text on the page, whitespace-normalized
    source: str  # committed results file
    number: str  # the number (or identifier) as written in the snippet
    value: str | Callable[[Any], Any]  # JSON path, or a function of the parsed file
    fmt: Callable[[Any], str]  # rounding

    def __str__(self) -> str:
        return f"{self.doc}: {self.number!r} in {self.snippet!r}"


def quotes(doc: str, snippet: str, source: str, *items: tuple[str, str | Callable, Callable]) -> list[Quote]:
    """Several numbers of one snippet: ``(number, value, fmt)`` each."""
    return [Quote(doc, snippet, source, number, value, fmt) for number, value, fmt in items]


RM, ARCH, DET, CAL, OPS, SEC, EXP, BEN = ("README.md", "docs/architecture.md", "docs/detection.md",
                                        "docs/calibration.md", "docs/operations.md", "docs/security.md",
                                        "docs/explain.md", "docs/benchmarks.md")
OWN_PAGE = "docs/own-model.md"
T = "test/chosen/"

QUOTES: list[Quote] = [
    # --- README ---
    *quotes(RM, "test part: 300 attacked inputs from 230 sources, 1,081 clean inputs", STUDY,
            ("300", "data/test/images", count), ("230", "data/test/sources", count),
            ("1,081", T + "fgsm_8/clean", count)),
    *quotes(RM, "FGSM 8/255 0.996, PGD 4/255 0.996, PGD 2/255 0.971, transfer 0.978", STUDY,
            ("0.996", T + "fgsm_8/auc/value", dec(3)), ("0.996", T + "pgd_linf_4/auc/value", dec(3)),
            ("0.971", T + "pgd_linf_2/auc/value", dec(3)), ("0.978", T + "transfer_lite1/auc/value", dec(3))),
    *quotes(RM, "(DeepFool 0.797, C&W 0.833, Square 0.864)", STUDY,
            ("0.797", T + "deepfool/auc/value", dec(3)), ("0.833", T + "cw_l2/auc/value", dec(3)),
            ("0.864", T + "square/auc/value", dec(3))),
    *quotes(RM, "it flags 4.3 % of the test sources' clean inputs (by-source interval [3.1, 5.9])", STUDY,
            ("4.3", "threshold_transfer/chosen/0.05/value", pct(1)),
            ("3.1", "threshold_transfer/chosen/0.05/by_source/low", pct(1)),
            ("5.9", "threshold_transfer/chosen/0.05/by_source/high", pct(1))),
    *quotes(RM, "leaves 0 of 12 test inputs correctly classified or flagged", STUDY,
            ("0", adaptive_worst, count), ("12", "adaptive/rows/0/n", count)),
    *quotes(RM, "costs 2.51× a plain forward pass at batch 1 and 1.42× at batch 16 on CPU", COST,
            ("2.51", cost_row(1, "ratio_to_plain_forward"), dec(2)),
            ("1.42", cost_row(16, "ratio_to_plain_forward"), dec(2))),
    *quotes(RM, "scores the 10 bundled crops and flags 2 of 10, the cat at score 1.44 against the threshold 1.25",
            BUNDLED, ("10", "runs/default/images", count), ("2", "runs/default/flagged", count),
            ("1.44", bundled_row("default", "bundled:chelsea_0_75_300", "score"), dec(2)),
            ("1.25", "runs/default/threshold", dec(2))),
    Quote(RM, "fixed-signals`, the previous default, flags 0 of 10", BUNDLED, "0", "runs/fixed-signals/flagged", count),
    Quote(RM, "`cal-7de9d70d156d` for the shipped default", BUNDLED, "cal-7de9d70d156d", "runs/default/calibration", text),
    Quote(RM, 'advsentry_threshold{model="efficientnet-lite0",version=""} 1.249947592957264', BUNDLED,
          "1.249947592957264", "runs/default/threshold", repr),
    Quote(RM, 'calibration_id="cal-7de9d70d156d"', BUNDLED, "cal-7de9d70d156d", "runs/default/calibration", text),
    *quotes(RM, "The proxy's own overhead was last measured on 2026-11-22, with an older detector "
            "(`cal-2b434e31846f`", PROXY, ("2026-11-22", "created_at", day),
            ("cal-2b434e31846f", "identity/annotation_example/advsentry_calibration", text)),
    *quotes(RM, "+1.15 ms at concurrency 1 on an identity model, and 15–33 % of direct Triton's throughput", PROXY,
            ("1.15", proxy_c1("vs_direct", "unary"), dec(2)),
            ("15", proxy_span("identity", "vs_direct", 0), pct(0)),
            ("33", proxy_span("identity", "vs_direct", -1), pct(0))),

    # --- architecture ---
    *quotes(ARCH, "(2026-11-22, with the detector of that time, `cal-2b434e31846f`;", PROXY,
            ("2026-11-22", "created_at", day),
            ("cal-2b434e31846f", "identity/annotation_example/advsentry_calibration", text)),
    *quotes(ARCH, "1.6–3.0× the requests/s of the maps path, and +0.97 to +1.15 ms instead of +3.84 to +4.45 ms",
            PROXY, ("1.6", signals_vs_maps(0), dec(1)), ("3.0", signals_vs_maps(-1), dec(1)),
            ("0.97", proxy_c1("vs_direct", "streaming"), dec(2)), ("1.15", proxy_c1("vs_direct", "unary"), dec(2)),
            ("3.84", proxy_c1("sidecar_maps_vs_direct", "streaming"), dec(2)),
            ("4.45", proxy_c1("sidecar_maps_vs_direct", "unary"), dec(2))),
    Quote(ARCH, "(max error 5.9e-07 in the committed benchmark)", KERNEL, "5.9e-07", kernel_max_error,
          lambda v: f"{v:.1e}"),

    # --- detection ---
    Quote(DET, "(the study that produced the shipped default, `cal-7de9d70d156d`)",
          R + "corpus_study_learned/default_detector.json", "cal-7de9d70d156d", "id", text),
    *quotes(DET, "The committed build kept 1,115 of 2,164 candidates, from 463 distinct sources; "
            "at a 0.5 floor only 684 candidates would have passed.", CORPUS,
            ("1,115", "stats/kept", count), ("2,164", "stats/candidates", count),
            ("463", "stats/sources/distinct_kept", count), ("684", corpus_at_least(0.5), count)),
    *quotes(DET, "574 dev inputs from 233 sources, 541 test inputs from 230 sources", CORPUS,
            ("574", "stats/sources/dev/images", count), ("233", "stats/sources/dev/kept", count),
            ("541", "stats/sources/test/images", count), ("230", "stats/sources/test/kept", count)),
    *quotes(DET, "(dev: 300 from 233 sources; test: 300 inputs from 230 sources)", STUDY,
            ("300", "data/dev/images", count), ("233", "data/dev/sources", count),
            ("300", "data/test/images", count), ("230", "data/test/sources", count)),
    Quote(DET, "1,081 on the test part", STUDY, "1,081", T + "fgsm_2/clean", count),
    Quote(DET, "Attacked: 300 inputs per part", STUDY, "300", "settings/test_images", count),
    *quotes(DET, "(dev CV mean AUC 0.970; 2 extra forward passes)", STUDY,
            ("0.970", "selection/chosen/cv_mean_auc", dec(3)), ("2", "selection/chosen/extra_forwards", dec(0))),
    *[Quote(DET, f"| {label} | {auc} | {tpr} |", STUDY, number, f"{T}{attack}/{key}", dec(3))
      for label, attack, auc, tpr in [
          ("FGSM 8/255", "fgsm_8", "0.996", "0.947"), ("PGD L∞ 4/255", "pgd_linf_4", "0.996", "0.950"),
          ("PGD L∞ 2/255", "pgd_linf_2", "0.971", "0.763"),
          ("transfer (PGD 8/255 on EfficientNet-Lite1)", "transfer_lite1", "0.978", "0.744"),
          ("FGSM 2/255", "fgsm_2", "0.926", "0.450"), ("single L2 gradient step", "gradient_l2", "0.897", "0.304"),
          ("Square (black box)", "square", "0.864", "0.071"), ("C&W L2", "cw_l2", "0.833", "0.250"),
          ("DeepFool", "deepfool", "0.797", "0.175")]
      for number, key in ((auc, "auc/value"), (tpr, "tpr/0.01/value"))],
    *quotes(DET, "One-pixel and boundary produced too few successful adversarials to judge (1 and 6).", STUDY,
            ("1", T + "one_pixel/adversarial", count), ("6", T + "boundary/adversarial", count)),
    *quotes(DET, "the paper's exact method does not separate here (test AUC 0.54–0.70), nor does the first, "
            "9-photo default (0.44–0.87); Feature Squeezing alone reaches 0.19–0.80", STUDY,
            ("0.54", auc_span("paper", only_judged=False, end=0), dec(2)),
            ("0.70", auc_span("paper", only_judged=False, end=-1), dec(2)),
            ("0.44", auc_span("first_study_default", only_judged=False, end=0), dec(2)),
            ("0.87", auc_span("first_study_default", only_judged=False, end=-1), dec(2)),
            ("0.19", auc_span("feature_squeezing", only_judged=False, end=0), dec(2)),
            ("0.80", auc_span("feature_squeezing", only_judged=False, end=-1), dec(2))),
    *quotes(DET, "the previous default `fixed-signals` reached 0.71–0.98", PREVIOUS_STUDY,
            ("0.71", auc_span("chosen", only_judged=True, end=0), dec(2)),
            ("0.98", auc_span("chosen", only_judged=True, end=-1), dec(2))),
    *quotes(DET, "Fooling images (8 CPPN images", STUDY, ("8", "fooling/images", count)),
    *quotes(DET, "(0.88 of them at the 5 % threshold) but by none of the entropy-based or learned detectors, "
            "the shipped default included (0.00)", STUDY,
            ("0.88", "fooling/flagged/feature_squeezing/0.05", dec(2)),
            ("0.00", "fooling/flagged/chosen/0.05", dec(2))),
    *quotes(DET, "the threshold flags **4.3 %** of the test sources' clean inputs (exact interval [3.2, 5.7]; "
            "redrawing whole test sources [3.1, 5.9]); for a 1 % target, 0.6 %.", STUDY,
            ("4.3", "threshold_transfer/chosen/0.05/value", pct(1)),
            ("3.2", "threshold_transfer/chosen/0.05/low", pct(1)),
            ("5.7", "threshold_transfer/chosen/0.05/high", pct(1)),
            ("3.1", "threshold_transfer/chosen/0.05/by_source/low", pct(1)),
            ("5.9", "threshold_transfer/chosen/0.05/by_source/high", pct(1)),
            ("0.6", "threshold_transfer/chosen/0.01/value", pct(1))),
    *quotes(DET, "The threshold's inputs are 181 clean dev inputs of 60 sources; the fits used 758 others, "
            "and the 144 that mix held and fitted originals are used for nothing.", STUDY,
            ("181", "threshold_protocol/held_clean", count), ("60", "threshold_protocol/held_sources", count),
            ("758", "threshold_protocol/fit_clean", count), ("144", "threshold_protocol/clean_rows/out", count)),
    Quote(DET, "flags 9.4 % of the held-out originals' inputs at a 5 % target", STUDY, "9.4",
          "threshold_protocol/out_of_fold_threshold_on_held/0.05/value", pct(1)),
    *quotes(DET, "2 of the 10 bundled scikit-image crops are flagged by the shipped default, 0 of 10 by "
            "`fixed-signals`", BUNDLED, ("2", "runs/default/flagged", count), ("10", "runs/default/images", count),
            ("0", "runs/fixed-signals/flagged", count)),
    *quotes(DET, "flagged 100 % of clean test inputs with top-1 probability below 0.1 and 73 % of those at 0.1–0.3",
            CONF03, ("100", "confidence/bands/0/chosen@0.05/value", pct(0)),
            ("73", "confidence/bands/1/chosen@0.05/value", pct(0))),
    *quotes(DET, "leaves 0 of 12 test inputs correctly classified or flagged at ε = 2, 4 and 8/255, against an "
            "undefended robust accuracy of 0", STUDY,
            ("0", adaptive_worst, count), ("12", "adaptive/rows/0/n", count),
            ("2", "adaptive/rows/0/eps_255", count), ("4", "adaptive/rows/3/eps_255", count),
            ("8", "adaptive/rows/6/eps_255", count), ("0", "adaptive/undefended_robust_accuracy/8", dec(0))),
    *quotes(DET, "is flagged (or fails) on 25–58 % of them", STUDY,
            ("25", adaptive_plain_pgd(0), pct(0)), ("58", adaptive_plain_pgd(-1), pct(0))),
    *quotes(DET, "Square L∞ 8/255 succeeds on 0.93 of its inputs with a median of 1 attack query", BLACKBOX,
            ("0.93", "attacks/square_linf_8/success_rate", dec(2)),
            ("1", "attacks/square_linf_8/queries_attack_count/median", dec(0))),
    *quotes(DET, "at 4/255 on 0.87, median 9.5", BLACKBOX,
            ("0.87", "attacks/square_linf_4/success_rate", dec(2)),
            ("9.5", "attacks/square_linf_4/queries_attack_count/median", dec(1))),
    *quotes(DET, "against 40 clean test inputs (by-source bootstrap): Square 8/255 0.839 [0.75, 0.92], 4/255 0.869 "
            "[0.79, 0.94], HopSkipJump 0.881 [0.75, 0.98]", BLACKBOX,
            ("40", "detection/square_linf_8/default/clean", count),
            *[(n, f"detection/{a}/default/auc/{k}", dec(d)) for a, vals in [
                ("square_linf_8", ("0.839", "0.75", "0.92")), ("square_linf_4", ("0.869", "0.79", "0.94")),
                ("hopskipjump", ("0.881", "0.75", "0.98"))]
              for n, k, d in zip(vals, ("value", "low", "high"), (3, 2, 2))]),
    *quotes(DET, "(C&W and DeepFool ran on 16 and 40 test inputs)", STUDY,
            ("16", "attacks/test/cw_l2/attempted", count), ("40", "attacks/test/deepfool/attempted", count)),

    # --- calibration ---
    *quotes(CAL, "as are 2 of the 10 bundled scikit-image crops", BUNDLED,
            ("2", "runs/default/flagged", count), ("10", "runs/default/images", count)),
    *quotes(CAL, "run on 2026-11-30 with the default of that time, `cal-3a02ff8dfcbb`", TRAFFIC,
            ("2026-11-30", "created_at", day), ("cal-3a02ff8dfcbb", calibration_in("data/origin"), text)),
    Quote(CAL, "within 0.50 % of the exact order statistic in every cell", TRAFFIC, "0.50", sketch_error, pct(2)),
    *quotes(CAL, "gives a realized test-part FPR of 3.1 % for a 1 % target and 11.0 % for 5 %", TRAFFIC,
            ("3.1", traffic("dev->test", 0.0, 0.01, 0.0), pct(1)),
            ("11.0", traffic("dev->test", 0.0, 0.05, 0.0), pct(1))),
    *quotes(CAL, "between two source-disjoint halves of the test part, 2.0 % and 7.0 %", TRAFFIC,
            ("2.0", traffic("test half->other half", 0.0, 0.01, 0.0), pct(1)),
            ("7.0", traffic("test half->other half", 0.0, 0.05, 0.0), pct(1))),
    *quotes(CAL, "the 1 % target becomes 0.4 % realized (TPR falls from 36 % to 14 %); `--trim 0.05` gives 8.0 % "
            "(TPR 50 %)", TRAFFIC,
            ("0.4", traffic("dev->test", 0.05, 0.01, 0.0), pct(1)),
            ("36", traffic("dev->test", 0.0, 0.01, 0.0, "tpr"), pct(0)),
            ("14", traffic("dev->test", 0.05, 0.01, 0.0, "tpr"), pct(0)),
            ("8.0", traffic("dev->test", 0.05, 0.01, 0.05), pct(1)),
            ("50", traffic("dev->test", 0.05, 0.01, 0.05, "tpr"), pct(0))),

    # --- security ---
    *quotes(SEC, "run on 2026-11-30 before the learned signals shipped", DISCLOSURE, ("2026-11-30", "created_at", day)),
    *quotes(SEC, "Square-style steps within L∞ 8/255, a budget of 160 queries, 5 inputs so far", DISCLOSURE,
            ("8", "settings/eps_255", dec(0)), ("160", "settings/budget", count),
            ("5", "modes/score/attacked", count)),
    *quotes(SEC, "on 3 of 5 inputs (median 111 queries), with `verdict` on 1 of 5", DISCLOSURE,
            ("3", "modes/score/evaded", count), ("5", "modes/score/attacked", count),
            ("111", "modes/score/queries_median", count), ("1", "modes/verdict/evaded", count),
            ("5", "modes/verdict/attacked", count)),
    *quotes(SEC, "of 1,000 simulated clean clients × 20 corpus **dev** images each (0.84 → 0.42)", PROBING,
            ("1,000", "threshold/dev/clients", count), ("20", "threshold/dev/queries", count),
            ("0.84", "threshold/sweep/8/q001", dec(2)), ("0.42", "threshold/chosen", dec(2))),
    *quotes(SEC, "0 of 1,000 clean clients are flagged (their smallest distance is 0.82; attack queries sit at a "
            "median 0.0016)", PROBING, ("0", "clean_test/flagged", count), ("1,000", "clean_test/clients", count),
            ("0.82", "clean_test/client_min_distance/0.0", dec(2)),
            ("0.0016", "embedding_choice/candidates/pixels16_proj64/attack_median", dec(4))),
    *quotes(SEC, "detection came after 4 queries for Square (8/255 and 4/255), 10 for one-pixel and 12 for "
            "HopSkipJump and boundary", PROBING,
            ("4", sidecar_detection("square"), dec(0)), ("4", sidecar_detection("square_eps4"), dec(0)),
            ("10", sidecar_detection("one_pixel"), dec(0)), ("12", sidecar_detection("hopskipjump"), dec(0)),
            ("12", sidecar_detection("boundary"), dec(0))),
    *quotes(SEC, "all of them are caught at their 4th–5th query", PROBING,
            ("4", offline_detection(0), dec(0)), ("5", offline_detection(-1), dec(0))),
    *quotes(SEC, "is 5 for Square 8/255 (15 of 16 images fooled), 16 for Square 4/255 (13 of 16), 69 for "
            "HopSkipJump and 238 for boundary (1 of 16 each", PROBING,
            ("5", "queries_to_success/attacks/square/median", dec(0)),
            ("15", "queries_to_success/attacks/square/successes", count),
            ("16", "queries_to_success/attacks/square/images", count),
            ("16", "queries_to_success/attacks/square_eps4/median", dec(0)),
            ("13", "queries_to_success/attacks/square_eps4/successes", count),
            ("69", "queries_to_success/attacks/hopskipjump/median", dec(0)),
            ("238", "queries_to_success/attacks/boundary/median", dec(0)),
            ("1", "queries_to_success/attacks/boundary/successes", count)),
    *quotes(SEC, "and one-pixel fooled 0 of 16.", PROBING,
            ("0", "queries_to_success/attacks/one_pixel/successes", count)),
    *quotes(SEC, "boundary and one-pixel in 2 of 2 runs each, median 10 queries overall. **Not met for Square "
            "8/255** (1 of 2 runs)", PROBING,
            ("2", "summary/attacks/one_pixel/runs_detected_in_time", count),
            ("10", "summary/median_detection", dec(0)),
            ("1", "summary/attacks/square/runs_detected_in_time", count),
            ("2", "summary/attacks/square/runs", count)),
    *quotes(SEC, "fools the bundled model on 3 of 4 photos (2 of 4 at 4/255)", PROBING,
            ("3", fooled_first("square"), count), ("2", fooled_first("square_eps4"), count),
            ("4", lambda d: len(d["summary"]["attacks"]["square"]["first_fooled_offline"]), count)),
    *quotes(SEC, "A 30-frame benign video burst is flagged at its 4th frame.", PROBING,
            ("30", "video/frames", count), ("4", "video/queries_until_detection", count)),
    *quotes(SEC, "Observing a query costs about 21 µs with a history of 100 (79 µs at 1,000), and a client's "
            "history of 100 embeddings holds 25,600 bytes.", PROBING,
            ("21", "cost/100/median_us", dec(0)), ("79", "cost/1000/median_us", dec(0)),
            ("25,600", "cost/100/bytes_per_client", count)),
    Quote(SEC, "clients: about 26 MB at most with the defaults", PROBING, "26",
          lambda d: d["cost"]["100"]["bytes_per_client"] * 1024 / 1e6, dec(0)),  # × probing_max_clients (1024)
    Quote(SEC, "leaves 0 of 12 test inputs correctly classified or flagged at every ε tried", STUDY, "0",
          adaptive_worst, count),

    # --- explain ---
    *quotes(EXP, 'flagged at score 1.888, "balanced" with a promotion share of 0.56', EXPLAIN,
            ("1.888", "score", dec(3)), ("balanced", "promotion_suppression/category", text),
            ("0.56", "promotion_suppression/promotion_share", dec(2))),
    *quotes(EXP, "`cal-3a02ff8dfcbb` (now `fixed-signals`, threshold 1.073)", EXPLAIN,
            ("cal-3a02ff8dfcbb", "calibration", text), ("1.073", "threshold", dec(3))),
    *quotes(EXP, "(median 0.97 vs 3.20 clean; AUC 0.05 [0.01, 0.10], i.e. lower on adversarials)", PROBE,
            ("0.97", probe_median("fgsm", "lipschitz_logits"), dec(2)),
            ("3.20", probe_median("clean", "lipschitz_logits"), dec(2)),
            ("0.05", probe_auc("fgsm", "lipschitz_logits", "auc"), dec(2)),
            ("0.01", probe_auc("fgsm", "lipschitz_logits", "low"), dec(2)),
            ("0.10", probe_auc("fgsm", "lipschitz_logits", "high"), dec(2))),
    *quotes(EXP, "(median 0.97 vs 0.69; AUC 0.90 [0.81, 0.96] FGSM, 0.91 [0.83, 0.97] PGD)", PROBE,
            ("0.97", probe_median("fgsm", "mantel_logits"), dec(2)),
            ("0.69", probe_median("clean", "mantel_logits"), dec(2)),
            ("0.90", probe_auc("fgsm", "mantel_logits", "auc"), dec(2)),
            ("0.81", probe_auc("fgsm", "mantel_logits", "low"), dec(2)),
            ("0.96", probe_auc("fgsm", "mantel_logits", "high"), dec(2)),
            ("0.91", probe_auc("pgd_linf", "mantel_logits", "auc"), dec(2)),
            ("0.83", probe_auc("pgd_linf", "mantel_logits", "low"), dec(2)),
            ("0.97", probe_auc("pgd_linf", "mantel_logits", "high"), dec(2))),
    Quote(EXP, "(Spearman 0.03)", PROBE, "0.03", "spearman_with_top1_probability/mantel_logits", dec(2)),
    *quotes(EXP, "separates PGD (AUC 0.00 [0.00, 0.02]) but mostly restates the confidence (Spearman −0.51)", PROBE,
            ("0.00", probe_auc("pgd_linf", "lipschitz_softmax", "auc"), dec(2)),
            ("0.00", probe_auc("pgd_linf", "lipschitz_softmax", "low"), dec(2)),
            ("0.02", probe_auc("pgd_linf", "lipschitz_softmax", "high"), dec(2)),
            ("−0.51", "spearman_with_top1_probability/lipschitz_softmax", dec(2))),
    *quotes(EXP, "On the corpus's dev part (30 images", PROBE, ("30", "attacks/fgsm/attempted", count)),
    Quote(EXP, "against the shipped detector's 2 extra forward passes", STUDY, "2",
          "selection/chosen/extra_forwards", dec(0)),

    # --- benchmarks ---
    *quotes(BEN, "`benchmarks/results/detection_cost.json` | 2026-11-30 | `cal-6f08f2e58e67`", COST,
            ("2026-11-30", "created_at", day), ("cal-6f08f2e58e67", "detector/calibration", text)),
    *quotes(BEN, "`benchmarks/results/proxy_overhead.json` | 2026-11-22 | `cal-2b434e31846f`", PROXY,
            ("2026-11-22", "created_at", day),
            ("cal-2b434e31846f", "identity/annotation_example/advsentry_calibration", text)),
    Quote(BEN, "`benchmarks/results/sidecar_memory.json` | 2026-11-22", MEMORY, "2026-11-22", "created_at", day),
    Quote(BEN, "`benchmarks/results/disclosure_evasion.json` | 2026-11-30", DISCLOSURE, "2026-11-30", "created_at", day),
    *quotes(BEN, "`benchmarks/results/traffic_calibration.json` | 2026-11-30 | `cal-3a02ff8dfcbb`", TRAFFIC,
            ("2026-11-30", "created_at", day), ("cal-3a02ff8dfcbb", calibration_in("data/origin"), text)),
    Quote(BEN, "`benchmarks/results/explain_sample/explanation.json` | — | `cal-3a02ff8dfcbb`", EXPLAIN,
          "cal-3a02ff8dfcbb", "calibration", text),
    Quote(BEN, "`benchmarks/results/probing.json` | 2026-12-04", PROBING, "2026-12-04", "created_at", day),
    Quote(BEN, "`benchmarks/results/fuzz.json`, `fault_soak.json` | 2026-11-30", FUZZ, "2026-11-30", "created_at", day),
    Quote(BEN, "`benchmarks/results/fuzz.json`, `fault_soak.json` | 2026-11-30", SOAK, "2026-11-30", "created_at", day),
    Quote(BEN, "`benchmarks/results/corpus_study_learned/results.json` | the shipped default's study | "
          "`cal-7de9d70d156d`", R + "corpus_study_learned/default_detector.json", "cal-7de9d70d156d",
          "id", text),
    Quote(BEN, "`benchmarks/results/corpus_study_learned/blackbox.json` | rescored with the shipped default | "
          "`cal-7de9d70d156d`", BLACKBOX, "cal-7de9d70d156d", "detector/calibration_id", text),
    *quotes(BEN, "123.3× at batch 64 (43.9× at batch 1), max error 5.9e-07", KERNEL,
            ("123.3", kernel_row(64, "speedup"), dec(1)), ("43.9", kernel_row(1, "speedup"), dec(1)),
            ("5.9e-07", kernel_max_error, lambda v: f"{v:.1e}")),
    *quotes(BEN, "2.51× at batch 1 (52.9 vs 21.1 ms per image), 1.42× at batch 16 (44.7 vs 31.5 ms per image)", COST,
            ("2.51", cost_row(1, "ratio_to_plain_forward"), dec(2)),
            ("52.9", cost_row(1, "detection_ms_per_image"), dec(1)),
            ("21.1", cost_row(1, "plain_forward_ms_per_image"), dec(1)),
            ("1.42", cost_row(16, "ratio_to_plain_forward"), dec(2)),
            ("44.7", cost_row(16, "detection_ms_per_image"), dec(1)),
            ("31.5", cost_row(16, "plain_forward_ms_per_image"), dec(1))),
    *quotes(BEN, "+0.8 MiB after warm-up over 464,575 requests (signals path), +1.3 MiB over 213,455 requests "
            "(maps path)", MEMORY,
            ("0.8", "growth_after_warmup_mib", dec(1)), ("464,575", "requests", count),
            ("1.3", "maps_path/growth_after_warmup_mib", dec(1)), ("213,455", "maps_path/requests", count)),
    *quotes(BEN, "100,000 requests: 0 crashes, 0 hangs", FUZZ,
            ("100,000", "totals/requests", count), ("0", "totals/crashes", count), ("0", "totals/hangs", count)),
    *quotes(BEN, "2,094 unary calls and 7,987 stream messages with 0 hangs and 0 lost; recovery at most 0.68 s; "
            "RSS +4.7 %", SOAK,
            ("2,094", "unary/calls", count), ("7,987", "streams/messages_sent", count), ("0", "hangs", count),
            ("0", "streams/lost", count), ("0.68", "recovery_s/max", dec(2)),
            ("4.7", "rss_mib/growth_after_warmup_pct", dec(1))),
    *quotes(BEN, "1 of 5 evaded against 3 of 5", DISCLOSURE,
            ("1", "modes/verdict/evaded", count), ("5", "modes/verdict/attacked", count),
            ("3", "modes/score/evaded", count)),
    *quotes(BEN, "median 10 queries, 0 of 1,000 clean clients", PROBING,
            ("10", "summary/median_detection", dec(0)), ("0", "clean_test/flagged", count),
            ("1,000", "clean_test/clients", count)),
    *quotes(BEN, "The committed file was created on 2026-11-22 with `cal-2b434e31846f`", PROXY,
            ("2026-11-22", "created_at", day),
            ("cal-2b434e31846f", "identity/annotation_example/advsentry_calibration", text)),
    *quotes(BEN, "the sidecar adds +1.15 ms (unary) and +0.97 ms (streaming) at concurrency 1, and reaches 15–33 % "
            "of direct Triton's throughput", PROXY,
            ("1.15", proxy_c1("vs_direct", "unary"), dec(2)), ("0.97", proxy_c1("vs_direct", "streaming"), dec(2)),
            ("15", proxy_span("identity", "vs_direct", 0), pct(0)),
            ("33", proxy_span("identity", "vs_direct", -1), pct(0))),
    *quotes(BEN, "adds +3.84 to +4.45 ms at concurrency 1: the signals-in-Triton path serves 1.6–3.0× its requests/s",
            PROXY, ("3.84", proxy_c1("sidecar_maps_vs_direct", "streaming"), dec(2)),
            ("4.45", proxy_c1("sidecar_maps_vs_direct", "unary"), dec(2)),
            ("1.6", signals_vs_maps(0), dec(1)), ("3.0", signals_vs_maps(-1), dec(1))),
    *quotes(BEN, "the Python byte forwarder reaches 23–59 % of direct throughput and nginx `grpc_pass` 60–73 %", PROXY,
            ("23", proxy_span("identity", "python_floor_vs_direct", 0), pct(0)),
            ("59", proxy_span("identity", "python_floor_vs_direct", -1), pct(0)),
            ("60", proxy_span("identity", "native_floor_vs_direct", 0), pct(0)),
            ("73", proxy_span("identity", "native_floor_vs_direct", -1), pct(0))),
    *quotes(BEN, "the sidecar keeps 90–105 % of the throughput", PROXY,
            ("90", proxy_span("efficientnet", "vs_direct_with_entropies", 0), pct(0)),
            ("105", proxy_span("efficientnet", "vs_direct_with_entropies", -1), pct(0))),
    # --- docs/detection.md: black-box mode (benchmarks/results/blackbox*/, blackbox_cost.json) ---
    *quotes(DET, "- `blackbox` (`cal-9155e22fb872`)", BB, ("cal-9155e22fb872", "id", text)),
    *quotes(DET, "- `blackbox-squeeze` (`cal-ac1ffabb5595`)", BB_SQ, ("cal-ac1ffabb5595", "id", text)),
    *[q for source in (BB, BB_SQ) for q in quotes(
        DET, "measured on the held-out split: **1.4 %** realized FPR at the 5 % target for each (2 of 140,\n[0.2, 5.1])",
        source,
        ("1.4", lambda d: 100 * d["results"]["operating_points"][0]["held_out_fpr"], dec(1)),
        ("2", "results/operating_points/0/held_out_false_positives", count),
        ("140", "results/operating_points/0/held_out_clean", count),
        ("0.2", lambda d: 100 * d["results"]["operating_points"][0]["held_out_fpr_interval"]["low"], dec(1)),
        ("5.1", lambda d: 100 * d["results"]["operating_points"][0]["held_out_fpr_interval"]["high"], dec(1)))],
    *[q for source in (BB, BB_SQ, BB_EXPORTED) for q in quotes(
        DET, "(360 candidates, the bundled model), thresholds set on the threshold split (58 clean images)", source,
        ("360", "job/max_images", count), ("58", "results/operating_points/0/threshold_set_on/clean", count))],
    *[q for label, attack, row in BB_TABLE for column, source in enumerate((BB_SQ, BB, BB_EXPORTED))
      if row[column] != "–" for q in quotes(
          DET, f"| {label} | " + " | ".join(row) + " |", source,
          (row[column].split()[0], f"results/attacks/{attack}/auc_by_source/value", dec(3)),
          (row[column].split()[1].strip("[,"), f"results/attacks/{attack}/auc_by_source/low", dec(2)),
          (row[column].split()[2].strip("]"), f"results/attacks/{attack}/auc_by_source/high", dec(2)))],
    *[q for label, attack, row in BB_TABLE for q in quotes(
        DET, f"| {label} | " + " | ".join(row) + " |", BB_SQ, (label.rsplit("(", 1)[1].rstrip(")"), f"results/attacks/{attack}/detection/adversarial", count))],
    *quotes(DET, "equal false alarms (5 % of the held-out clean images) `blackbox-squeeze` detects 0.600 of DeepFool,\n"
                 "0.738 of PGD and 0.413 of Square", BB_SQ,
            ("0.600", "results/attacks/deepfool/detection/tpr/0.05/value", dec(3)),
            ("0.738", "results/attacks/pgd_2/detection/tpr/0.05/value", dec(3)),
            ("0.413", "results/attacks/square_4/detection/tpr/0.05/value", dec(3))),
    *quotes(DET, "the exported default 0.677, 0.923 and 0.717", BB_EXPORTED,
            ("0.677", "results/attacks/deepfool/detection/tpr/0.05/value", dec(3)),
            ("0.923", "results/attacks/pgd_2/detection/tpr/0.05/value", dec(3)),
            ("0.717", "results/attacks/square_4/detection/tpr/0.05/value", dec(3))),
    *quotes(DET, "exported default realized 9.3 % [5.0, 15.4] at its 5 % target", BB_EXPORTED,
            ("9.3", lambda d: 100 * d["results"]["operating_points"][0]["held_out_fpr"], dec(1)),
            ("5.0", lambda d: 100 * d["results"]["operating_points"][0]["held_out_fpr_interval"]["low"], dec(1)),
            ("15.4", lambda d: 100 * d["results"]["operating_points"][0]["held_out_fpr_interval"]["high"], dec(1))),
    *quotes(DET, "C&W has 14 held-out positives only (24 attacked", BB_SQ,
            ("14", "results/attacks/cw_l2/detection/adversarial", count), ("24", "results/attacks/cw_l2/attacked", count)),
    *quotes(DET, "take 7.53 ms per image at batch 1 and 5.45 ms at batch 16 (0.36× and 0.30× the bundled model's", BB_COST,
            ("7.53", "detectors/blackbox/rows/0/signals_ms_per_image", dec(2)),
            ("5.45", "detectors/blackbox/rows/1/signals_ms_per_image", dec(2)),
            ("0.36", "detectors/blackbox/rows/0/ratio", dec(2)), ("0.30", "detectors/blackbox/rows/1/ratio", dec(2))),
    *quotes(DET, "`blackbox-squeeze` 10.21 and 10.27 ms (squeezing included)", BB_COST,
            ("10.21", "detectors/blackbox-squeeze/rows/0/signals_ms_per_image", dec(2)),
            ("10.27", "detectors/blackbox-squeeze/rows/1/signals_ms_per_image", dec(2))),
    *quotes(DET, "plus **two** extra upstream calls", BB_COST, ("two", lambda d: {2: "two"}.get(d["detectors"]["blackbox-squeeze"]["extra_upstream_calls"]), text)),
    *quotes(DET, "(Triton\ncounted 3.0 model inferences per request)", BB_COST,
            ("3.0", "served/blackbox-squeeze/model_inferences_per_request", dec(1))),
    *quotes(DET, "p50 31.8 ms\ndirect, 51.7 ms with `blackbox`, 128.0 ms with `blackbox-squeeze`", BB_COST,
            ("31.8", lambda d: 1000 * d["served"]["direct"]["latency"]["p50"], dec(1)),
            ("51.7", lambda d: 1000 * d["served"]["blackbox"]["latency"]["p50"], dec(1)),
            ("128.0", lambda d: 1000 * d["served"]["blackbox-squeeze"]["latency"]["p50"], dec(1))),
    # --- docs/own-model.md: the journey's smoke run (benchmarks/results/own_model/) ---
    # --- docs/own-model.md: EfficientNet-Lite2 with its ImageNet weights (benchmarks/results/own_model/) ---
    *[q for label, attack, lite2, bundled in LITE2_TABLE for source, cell in ((LITE2, lite2), (BB_EXPORTED, bundled))
      for q in quotes(OWN_PAGE, f"| {label} | {lite2} | {bundled} |", source, *_auc_cell(attack, cell))],
    *quotes(OWN_PAGE, "took **806 s** to\ncalibrate at 224 px on 2 cores, 12.5 s to export and 6.1 s", LITE2_TIME,
            ("806", "wall_s/calibrate_224px", count),
            ("12.5", "wall_s/export_model", dec(1)), ("6.1", "wall_s/triton_and_sidecar_ready", dec(1))),
    *quotes(OWN_PAGE, "on the real-photo corpus's dev part (360 candidates)", LITE2, ("360", "job/max_images", count)),
    *quotes(OWN_PAGE, "calibrate at 224 px on 2 cores", LITE2, ("224", "job/image_size", count)),
    *quotes(OWN_PAGE, "The own model's calibration is 0.04–0.06 behind the bundled model's", LITE2,
            ("0.04", lambda d: min(json.loads((ROOT / BB_EXPORTED).read_text())["results"]["attacks"][a]["auc_by_source"]["value"]
                                   - d["results"]["attacks"][a]["auc_by_source"]["value"] for a in ("fgsm", "pgd_2", "deepfool", "square_4")),
             dec(2)),
            ("0.06", lambda d: max(json.loads((ROOT / BB_EXPORTED).read_text())["results"]["attacks"][a]["auc_by_source"]["value"]
                                   - d["results"]["attacks"][a]["auc_by_source"]["value"] for a in ("fgsm", "pgd_2", "deepfool", "square_4")),
             dec(2))),
    *quotes(OWN_PAGE, "the same job reported AUC 0.99–1.00", LITE2_UP,
            ("0.99", lambda d: min(d["results"]["attacks"][a]["auc_by_source"]["value"] for a in d["results"]["attacks"]), dec(2)),
            ("1.00", lambda d: max(d["results"]["attacks"][a]["auc_by_source"]["value"] for a in d["results"]["attacks"]), dec(2))),
    *quotes(OWN_PAGE, "calibration cal-814e7b753f36: threshold 1.092101 (target FPR 0.05)", OWN,
            ("cal-814e7b753f36", "id", text), ("1.092101", "threshold", dec(6))),
    *quotes(OWN_PAGE, "realized held-out FPR 0.0% [0.0, 18.5] (0/18)", OWN,
            ("0.0", lambda d: 100 * d["results"]["operating_points"][0]["held_out_fpr"], dec(1)),
            ("18.5", lambda d: 100 * d["results"]["operating_points"][0]["held_out_fpr_interval"]["high"], dec(1)),
            ("18", "results/operating_points/0/held_out_clean", count)),
    *quotes(OWN_PAGE, "set on threshold split: 12 clean, 12 sources", OWN,
            ("12", "results/operating_points/0/threshold_set_on/clean", count)),
    *quotes(OWN_PAGE, "fgsm: AUC 0.963", OWN, ("0.963", "results/attacks/fgsm/detection/auc/value", dec(3))),
    *quotes(OWN_PAGE, "TPR at threshold 0.778", OWN, ("0.778", "results/attacks/fgsm/tpr_at_threshold/0.05", dec(3))),
    *quotes(OWN_PAGE, "Expected output (60 images, 28 s on 2 cores;", OWN_TIMES,
            ("28", "wall_s/calibrate", dec(0))),
    *quotes(OWN_PAGE, "(2.8 s.)", OWN_TIMES, ("2.8", "wall_s/export", dec(1))),
]

NUMBER = re.compile(r"\d{4}-\d{2}-\d{2}|[−-]?\d[\d,]*(?:\.\d+)?(?:e[−-]?\d+)?")


def numbers_in(snippet: str) -> set[str]:
    return {token.rstrip(",") for token in NUMBER.findall(snippet)}


def value_of(quote: Quote) -> Any:
    data = load(quote.source)
    return quote.value(data) if callable(quote.value) else at(data, quote.value)


@pytest.mark.parametrize("quote", QUOTES, ids=str)
def test_quoted_result_matches_its_results_file(quote: Quote) -> None:
    snippet = " ".join(quote.snippet.split())
    assert snippet in page(quote.doc), f"{quote.doc} no longer contains {snippet!r}"
    if quote.fmt is text:
        assert quote.number in snippet, f"{quote.number!r} is not in the snippet {snippet!r}"
    else:
        assert quote.number in numbers_in(snippet), f"{quote.number!r} is not a number of {snippet!r}"
    assert (ROOT / quote.source).is_file(), f"results file {quote.source} is missing"
    actual = quote.fmt(value_of(quote))
    assert actual == quote.number, (f"{quote.doc} quotes {quote.number} in {snippet!r}, but {quote.source} "
                                    f"({quote.value if isinstance(quote.value, str) else quote.value.__name__}) "
                                    f"gives {actual}")


def test_every_quote_comes_from_a_committed_results_file() -> None:
    for quote in QUOTES:
        assert quote.source.startswith(("benchmarks/results/", "docs/results/")), quote


def test_the_shipped_detector_is_the_one_the_study_reports() -> None:
    """The docs call corpus_study_learned's detector "the shipped default": the shipped artifact must be it."""
    shipped = json.loads((ROOT / "detector/data/default_detector.json").read_text(encoding="utf-8"))
    studied = load(R + "corpus_study_learned/default_detector.json")
    assert shipped["id"] == studied["id"]
    assert shipped["threshold"] == load(BUNDLED)["runs"]["default"]["threshold"]


def test_detection_cost_was_measured_on_the_shipped_signals() -> None:
    """docs/benchmarks.md: the detection-cost run is 'an earlier fit of the same six signals'."""
    shipped = json.loads((ROOT / "detector/data/default_detector.json").read_text(encoding="utf-8"))
    assert set(load(COST)["detector"]["features"]) == set(shipped["features"])


# ---- paths and links --------------------------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"^(?:service|detector|benchmarks|deploy|tests|docs|proto)/[A-Za-z0-9_.\-/]*$")


def raw(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"^#{1,6}\s+(.*?)\s*$", line):
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def cited_paths(doc: str) -> list[str]:
    """Repository paths in inline code (outside code blocks) and in code blocks."""
    text_ = raw(doc)
    blocks = FENCE.findall(text_)
    paths = [token for token in INLINE_CODE.findall(FENCE.sub("", text_)) if REPO_PATH.match(token)]
    for block in blocks:
        for token in block.split():
            token = token.strip("()[],;:'\"")
            if REPO_PATH.match(token):
                paths.append(token)
    return paths


@pytest.mark.parametrize("doc", PAGES)
def test_every_relative_link_exists(doc: str) -> None:
    here = (ROOT / doc).parent
    for target in LINK.findall(FENCE.sub("", raw(doc))):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = (here / path).resolve() if path else (ROOT / doc)
        assert resolved.exists(), f"{doc}: link {target!r} points at nothing ({resolved})"
        assert ROOT in resolved.parents or resolved == ROOT, f"{doc}: link {target!r} leaves the repository"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{doc}: link {target!r}: no heading #{anchor} in {path or doc}"


@pytest.mark.parametrize("doc", PAGES)
def test_every_cited_repository_path_exists(doc: str) -> None:
    missing = [p for p in cited_paths(doc) if not (ROOT / p).exists()]
    assert not missing, f"{doc} cites paths that do not exist: {missing}"


OLD_PATHS = ["service/inference.py", "service/detectors.py", "service/batching.py", "service/policy.py",
             "service/observe.py", "service/probing.py", "service/traffic.py", "service/capture.py",
             "service/shedding.py"]


@pytest.mark.parametrize("doc", PAGES)
def test_no_page_cites_a_module_path_that_moved(doc: str) -> None:
    cited = [old for old in OLD_PATHS if old in raw(doc)]
    assert not cited, f"{doc} still cites {cited} (see the module layout in docs/architecture.md)"


def test_the_docs_pages_exist() -> None:
    assert EXPECTED_PAGES <= set(PAGES)
    assert not (ROOT / "README.md.new").exists()


def test_readme_is_a_front_door() -> None:
    lines = raw("README.md").splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; depth belongs in docs/"
    for command in ("make run", "make test"):
        assert command in raw("README.md")


def test_make_targets_are_what_the_readme_says() -> None:
    makefile = raw("Makefile")
    assert re.search(r"^run: .*\n\t\$\(BIN\)/advsentry serve$", makefile, re.M)
    assert re.search(r"^test: .*\n\t\$\(BIN\)/python -m pytest", makefile, re.M)


def test_design_md_citations_point_at_the_environment_section() -> None:
    assert "environment" in anchors(ROOT / "docs/architecture.md")
    for path in ("Makefile", "pyproject.toml", "service/triton/server.py"):
        content = raw(path)
        assert "DESIGN.md" not in content, f"{path} cites DESIGN.md, which is not in the repository"
        assert "docs/architecture.md#environment" in content, path
    section = raw("docs/architecture.md").split("## Environment", 1)[1]
    for needed in ("torch 2.13.0", "CPU build", "LD_LIBRARY_PATH", "PYTHONPATH", "ADVSENTRY_PYTHONPATH",
                   "_recursion_count", "nvidia-pytriton"):
        assert needed in section, f"docs/architecture.md#environment does not explain {needed!r}"


# ---- names the pages document -----------------------------------------------------------------------

def rule_alerts() -> set[str]:
    return set(re.findall(r"^\s*- alert: (\w+)", raw("deploy/prometheus/advsentry-rules.yaml"), re.M))


def test_every_alert_is_documented_and_every_documented_alert_exists() -> None:
    alerts = rule_alerts()
    assert alerts, "no alert found in deploy/prometheus/advsentry-rules.yaml"
    operations = raw("docs/operations.md")
    assert not [a for a in alerts if f"`{a}`" not in operations], "alerts missing from docs/operations.md"
    for doc in PAGES:
        for name in set(re.findall(r"\bAdvsentry[A-Z]\w+", raw(doc))) - alerts:
            assert name == "AdvsentryCalibrationRefused" and "replaces `AdvsentryCalibrationRefused`" in raw(doc), \
                f"{doc} names an alert that does not exist: {name}"


def exposed_metrics() -> set[str]:
    source = raw("service/metrics.py") + "".join(raw(f"service/hooks/{m}.py") for m in
                                                  ("shedding", "capture", "probing", "traffic"))  # each hook's own
    found = set()
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(advsentry_[a-z_]+)\"", source):
        found.add(name + "_total" if kind == "Counter" else name)
    return found


def test_every_metric_is_documented() -> None:
    metrics = exposed_metrics()
    assert len(metrics) > 20
    operations = raw("docs/operations.md")
    missing = [m for m in sorted(metrics) if not re.search(rf"`{m}[`{{]", operations)]
    assert not missing, f"metrics missing from docs/operations.md#metrics: {missing}"


def setting_names() -> set[str]:
    tree = ast.parse(raw("service/settings.py"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and (node.name.endswith("Settings")):
            names |= {item.target.id for item in node.body
                      if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    return names - {"model_config"}


def test_every_setting_is_documented() -> None:
    names = setting_names()
    assert {"stream_max_in_flight", "strip_metadata", "scoring_failure", "config_file"} <= names
    operations = raw("docs/operations.md")
    missing = sorted(n for n in names if f"`{n}`" not in operations)
    assert not missing, f"settings missing from docs/operations.md#settings: {missing}"


def test_new_behaviour_is_documented_with_its_names() -> None:
    operations, security = raw("docs/operations.md"), raw("docs/security.md")
    for name in ("advsentry_calibration_reload_failures_total{model,reason}", "invalid_artifact", "model_mismatch",
                 "outputs_missing", "AdvsentryCalibrationReloadFailed", "advsentry_unscored_requests_total{model,reason}",
                 "scoring_error", "calibration_error", "no_threshold", "AdvsentryUnscoredRequests",
                 "AdvsentryNoThreshold", "scoring_failure", "stream_max_in_flight"):
        assert name in operations, name
    for name in ("strip_metadata", "trusted_metadata", "ModelStreamInfer", "pass-through RPCs", "DetectorService"):
        assert name in security, name
    architecture = " ".join(raw("docs/architecture.md").split())
    assert "`--calibration` takes an artifact file or a shipped detector's name, the same set for `serve`, `score`" \
        in architecture
    for name in ("`default`", "`fixed-signals`", "`entropy-9photo`", "`paper`"):
        assert name in architecture, name
    calibration = raw("docs/calibration.md")
    for name in ("--threshold-split", "--holdout", "threshold split"):
        assert name in calibration, name
