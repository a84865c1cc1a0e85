"""The calibration report: one self-contained HTML file (figures embedded as base64 PNGs).

Sections: a red banner when the sample is below the minimums
(:mod:`.sufficiency`), the sample size per split, operating points (target
FPR, threshold, which split set it, and beside the target the *realized*
FPR on the held-out split with its exact interval), the per-attack table (AUC with its by-source
interval or "not meaningful", TPR at the threshold with its exact interval),
ROC curves per attack, clean vs adversarial score histograms with the
threshold, a grid of examples (input, perturbation, feature response,
local entropy map; clean and adversarial), and the settings used. Also
:func:`markdown_table`, the same per-attack table as Markdown for notes and logs,
and :func:`operating_point_line`, the one-line form ``advsentry calibrate``
prints for each target FPR.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from detector.calibration import CalibrationArtifact
from detector.evaluation import roc

from .fit import AttackBank, Calibration

FPR_KEYS = ("0.01", "0.05", "0.1")


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(result: Calibration, labels: list[str]) -> str:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 5))
    clean = result.scores["clean_holdout"]
    for label in labels:
        positives = result.scores[label]
        if len(positives) and len(clean):
            fpr, tpr = roc(clean, positives)
            auc = result.per_attack[label]["detection"]["auc"]["value"]
            axis.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f}, n={len(positives)})")
    for point in result.operating_points:
        axis.axvline(point["target_fpr"], color="gray", lw=0.8, ls=":")
    axis.plot([0, 1], [0, 1], color="lightgray", lw=0.8)
    axis.set(xlabel="false-positive rate (held-out clean)", ylabel="true-positive rate (successful adversarials)",
             xlim=(0, 1), ylim=(0, 1.01), title="ROC per attack")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, loc="lower right")
    return _png(figure)


def histogram_figure(result: Calibration, labels: list[str]) -> str:
    plt = _pyplot()
    columns = min(3, max(1, len(labels)))
    rows = -(-max(1, len(labels)) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    clean = result.scores["clean_holdout"]
    everything = np.concatenate([clean, result.scores["clean_fit"], result.scores.get("clean_threshold", np.zeros(0)),
                                 *[result.scores[l] for l in labels]])
    bins = np.linspace(everything.min(), everything.max() + 1e-9, 30) if len(everything) else 10
    for axis, label in zip(axes.flat, labels):
        axis.hist(clean, bins=bins, alpha=0.6, density=True, label=f"clean held-out ({len(clean)})")
        if len(result.scores[label]):
            axis.hist(result.scores[label], bins=bins, alpha=0.6, density=True, label=f"adversarial ({len(result.scores[label])})")
        axis.axvline(result.threshold, color="red", lw=1.2, label=f"threshold {result.threshold:.4f}")
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("score")
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(labels):]:
        axis.axis("off")
    figure.tight_layout()
    return _png(figure)


def examples_figure(banks: dict[str, AttackBank]) -> str | None:
    """Per attack (first example found): clean, adversarial, perturbation, responses and entropy maps."""
    rows = [(label, bank.examples[0]) for label, bank in banks.items() if bank.examples]
    if not rows:
        return None
    plt = _pyplot()
    titles = ("clean input", "adversarial", "perturbation (x)", "response clean", "response adv.", "entropy clean", "entropy adv.")
    figure, axes = plt.subplots(len(rows), len(titles), figsize=(2.1 * len(titles), 2.3 * len(rows)), squeeze=False)
    for r, (label, ex) in enumerate(rows):
        clean = ex["clean"].permute(1, 2, 0).numpy()
        adversarial = ex["adversarial"].permute(1, 2, 0).numpy()
        delta = adversarial.astype(np.float32) - clean.astype(np.float32)
        gain = 0.5 / max(1.0, float(np.abs(delta).max()))
        vmax = float(max(ex["clean_entropy"].float().max(), ex["adversarial_entropy"].float().max()))
        panels = [
            (clean, {}),
            (adversarial, {}),
            ((0.5 + gain * delta).clip(0, 1), {}),
            (ex["clean_gray"].numpy(), {"cmap": "gray"}),
            (ex["adversarial_gray"].numpy(), {"cmap": "gray"}),
            (ex["clean_entropy"].float().numpy(), {"cmap": "inferno", "vmin": 0, "vmax": vmax}),
            (ex["adversarial_entropy"].float().numpy(), {"cmap": "inferno", "vmin": 0, "vmax": vmax}),
        ]
        for c, (image, kwargs) in enumerate(panels):
            axes[r, c].imshow(image, **kwargs)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c].replace("(x)", f"(x{gain * 255:.0f})"), fontsize=8)
        entropy_clean = float(ex["clean_entropy"].float().mean())
        entropy_adv = float(ex["adversarial_entropy"].float().mean())
        axes[r, 0].set_ylabel(f"{label}\n{ex['name'][:22]}", fontsize=7)
        axes[r, 6].set_xlabel(f"mean {entropy_clean:.3f} -> {entropy_adv:.3f} bits ({ex['map']})", fontsize=6)
    figure.tight_layout()
    return _png(figure)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _interval(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    return f"{entry['value']:.3f} [{_fmt(entry.get('low'))}, {_fmt(entry.get('high'))}]"


def auc_text(attack: dict[str, Any]) -> str:
    """AUC with its by-source interval, or "(not meaningful: N sources)" (older artifacts: the image bootstrap)."""
    by_source = attack.get("auc_by_source")
    if not by_source:
        return _interval(attack["detection"]["auc"])
    if by_source.get("value") is None:
        return "–"
    if not by_source.get("meaningful"):
        return f"{by_source['value']:.3f} ({by_source.get('note')})"
    return _interval(by_source)


def rate_text(entry: dict[str, Any] | None) -> str:
    """``0.050 [0.024, 0.090] (10/200)``: a rate with its exact interval and counts."""
    if not entry or entry.get("value") is None:
        return "–"
    return f"{_interval(entry)} ({entry['k']}/{entry['n']})"


def held_out_fpr_text(point: dict[str, Any]) -> str:
    if point.get("held_out_fpr_interval"):
        return rate_text(point["held_out_fpr_interval"])
    return f"{point['held_out_fpr']:.3f} ({point['held_out_false_positives']}/{point['held_out_clean']})"


def _percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def threshold_set_on_text(point: dict[str, Any]) -> str:
    """``threshold split: 140 clean, 12 sources``: the rows that set an operating point's threshold.

    Artifacts made before the threshold split have no ``threshold_set_on``:
    their threshold was set on the fit split.
    """
    found = point.get("threshold_set_on")
    if not found:
        return "fit split"
    splits = list(found.get("splits") or ())
    name = " + ".join(splits) + (" split" if len(splits) == 1 else " splits")
    return f"{name}: {found.get('clean')} clean, {found.get('sources')} sources"


def realized_fpr_text(point: dict[str, Any]) -> str:
    """``5.6% [3.1, 9.2] (14/250)``: the held-out FPR at a threshold, in percent, with its exact 95 % interval."""
    entry = point.get("held_out_fpr_interval")
    if not entry:
        return f"{_percent(point.get('held_out_fpr'))}% ({point.get('held_out_false_positives')}/{point.get('held_out_clean')})"
    if entry.get("value") is None:
        return f"– (n={entry.get('n', 0)})"
    return (f"{_percent(entry['value'])}% [{_percent(entry.get('low'))}, {_percent(entry.get('high'))}] "
            f"({entry['k']}/{entry['n']})")


def operating_point_line(point: dict[str, Any]) -> str:
    """One operating point as ``advsentry calibrate`` prints it: target, threshold, what set it, realized FPR beside the target.

    ``target FPR 5%: threshold 1.234000 (set on threshold split: 140 clean, 12 sources);
    realized held-out FPR 5.6% [3.1, 9.2] (14/250)``. The realized FPR is
    measured on held-out images, from originals no fit and no threshold saw;
    its interval is exact (Clopper–Pearson 95 %).
    """
    return (f"target FPR {100 * point['target_fpr']:g}%: threshold {point['threshold']:.6f} "
            f"(set on {threshold_set_on_text(point)}); realized held-out FPR {realized_fpr_text(point)}")


def _tpr_at_fpr_text(detection: dict[str, Any], key: str) -> str:
    """TPR at an FPR point; flagged when the held-out split has fewer than 1/FPR clean images (no such threshold exists)."""
    text = _interval(detection["tpr"].get(key))
    if text != "–" and detection.get("clean", 0) * float(key) < 1:
        text += f" (n={detection['clean']} < 1/FPR)"
    return text


TABLE_COLUMNS = ("attack", "scenario", "attacked", "success", "L∞·255 / L2 / L0 (median)", "queries/img",
                 "positives", "AUC [by source]", "TPR@1%", "TPR@5%", "TPR@10%", "TPR @ threshold [exact]")


def table_rows(artifact: CalibrationArtifact) -> list[list[str]]:
    """The per-attack table (held-out clean vs successful adversarials), as strings."""
    rows = []
    primary = f"{artifact.target_fpr:g}"
    order = [spec["label"] for spec in artifact.job.get("attacks", ())] or list(artifact.results["attacks"])
    for label in order:
        a = artifact.results["attacks"][label]
        detection = a["detection"]
        success = _fmt(a["success_rate"], 2)
        if a.get("surrogate_success_rate") is not None:
            success += f" (surrogate {_fmt(a['surrogate_success_rate'], 2)})"
        size = f"{_fmt(a['linf_255_median'], 2)} / {_fmt(a['l2_median'], 3)} / {_fmt(a['l0_median'], 0)}"
        queries = "–" if a.get("queries_mean") is None else f"{a['queries_mean']:.0f} (total {a['queries_total']})"
        rows.append([
            label + (" (targeted)" if a["targeted"] else ""), a["scenario"], str(a["attacked"]), success, size, queries,
            str(detection["adversarial"]), auc_text(a),
            *[_tpr_at_fpr_text(detection, key) for key in FPR_KEYS],
            rate_text(a["tpr_at_threshold_interval"].get(primary)) if a.get("tpr_at_threshold_interval")
            else _fmt(a["tpr_at_threshold"].get(primary)),
        ])
    return rows


def markdown_table(artifact: CalibrationArtifact) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(artifact)]
    lines += ["", "| target FPR | threshold | set on | FPR on the rows that set it | realized held-out FPR [exact 95 %] |",
              "|---|---|---|---|---|"]
    for p in artifact.results["operating_points"]:
        lines.append(f"| {p['target_fpr']:g} | {p['threshold']:.6f} | {threshold_set_on_text(p)} | "
                     f"{_fmt(p.get('threshold_rows_fpr', p.get('fit_fpr')))} | {held_out_fpr_text(p)} |")
    warning = (artifact.data.get("sample_size") or {}).get("warning")
    if warning:
        lines = ["> **WARNING** " + " ".join(warning.splitlines()), "", *lines]
    return "\n".join(lines) + "\n"


def _html_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222 }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top }
th { background: #f3f3f3 } pre { background: #f7f7f7; padding: 1em; font-size: 12px; overflow-x: auto }
img { max-width: 100%; } .note { color: #555; font-size: 13px }
.insufficient { background: #b00020; color: #fff; padding: 1em 1.5em; border-radius: 4px; margin: 1em 0 }
.insufficient h2 { margin-top: 0 } .insufficient pre { background: transparent; color: #fff; padding: 0; white-space: pre-wrap }
"""


def sample_size_banner(artifact: CalibrationArtifact) -> str:
    """The red banner at the top of the report when the sample is below the minimums ("" otherwise)."""
    size = artifact.data.get("sample_size") or {}
    if size.get("sufficient", True) or not size.get("warning"):
        return ""
    return ("<div class='insufficient' id='insufficient-sample'><h2>Warning: sample too small to trust this threshold</h2>"
            f"<pre>{html.escape(size['warning'])}</pre></div>")


def upscaling_banner(artifact: CalibrationArtifact) -> str:
    """The red banner when most clean images were upscaled to the image size (AUCs optimistic; "" otherwise)."""
    from .data import upscaling_warning

    text = upscaling_warning(artifact.data)
    if text is None:
        return ""
    return ("<div class='insufficient' id='upscaled-images'><h2>Warning: clean images upscaled, detection looks better "
            f"than it is</h2><pre>{html.escape(text)}</pre></div>")


def _sample_rows(size: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(what, used, minimum or None) per split; artifacts from before the threshold split: held-out and fit only."""
    required = size.get("required", {})
    on = size.get("threshold_set_on")
    if not on:
        return [(name, size.get(key), required.get(key)) for name, key in (
            ("clean images, held-out", "clean_holdout"), ("sources, held-out", "sources_holdout"),
            ("clean images, fit", "clean_fit"), ("sources, fit", "sources_fit"))]
    names = list(on.get("splits") or ())
    splits = " + ".join(names) + (" split" if len(names) == 1 else " splits")
    refit = size.get("refit")
    return [
        ("clean images, held-out (realized FPR)", size.get("clean_holdout"), required.get("clean_holdout")),
        ("sources, held-out", size.get("sources_holdout"), required.get("sources_holdout")),
        (f"clean images setting the threshold ({splits})", on.get("clean"), required.get("clean_threshold")),
        (f"sources setting the threshold ({splits})", on.get("sources"), required.get("sources_threshold")),
        ("clean images, fit" + (" (refitted on)" if refit else " (nothing refitted)"), size.get("clean_fit"), required.get("clean_fit")),
        ("sources, fit", size.get("sources_fit"), required.get("sources_fit")),
        ("clean images, threshold split", size.get("clean_threshold"), None),
        ("clean images mixing splits (used for nothing)", size.get("clean_mixed", 0), None),
    ]


def sample_size_table(artifact: CalibrationArtifact) -> str:
    size = artifact.data.get("sample_size")
    if not size:
        return ""
    rows = [[name, str(used), "–" if need is None else str(need),
             "" if need is None else "ok" if (used or 0) >= need else "TOO FEW"]
            for name, used, need in _sample_rows(size)]
    minimum = size.get("min_adversarial_per_attack", 0)
    rows += [[f"successful adversarials, {label}", str(n), f"{minimum} (advisory)", "ok" if n >= minimum else "few"]
             for label, n in size.get("adversarial_per_attack", {}).items()]
    return ("<h2>Sample size</h2><p class='note'>Minimums for a threshold at the target FPR in force (why: "
            "README, \"Calibration\"). Sources are photos, files or corpus sources: the split and the AUC interval "
            "resample whole sources.</p>" + _html_table(["", "used", "minimum", ""], rows))


def write_report(path: str | Path, artifact: CalibrationArtifact, result: Calibration, banks: dict[str, AttackBank]) -> Path:
    """Write the HTML report next to (and describing) ``artifact``."""
    labels = list(banks)
    points = [
        [f"{p['target_fpr']:g}", f"{p['threshold']:.6f}", threshold_set_on_text(p),
         _fmt(p.get("threshold_rows_fpr", p.get("fit_fpr"))), held_out_fpr_text(p), str(p.get("held_out_sources", "–"))]
        for p in artifact.results["operating_points"]
    ]
    settings = {
        "model": artifact.model.to_dict(),
        "detector": {"features": {k: v.to_dict() for k, v in artifact.features.items()}, "combiner": artifact.combiner.to_dict(),
                     "combiner fitted": artifact.results["combiner"]},
        "job": artifact.job,
        "data": artifact.data,
        "versions": artifact.versions,
    }
    examples = examples_figure(banks)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>advsentry calibration {html.escape(artifact.id)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>advsentry calibration <code>{html.escape(artifact.id)}</code></h1>",
        sample_size_banner(artifact),
        upscaling_banner(artifact),
        f"<p class='note'>model {html.escape(artifact.model.name)} (weights sha256 {html.escape(artifact.model.weights_sha256[:16])}…), "
        f"created {html.escape(artifact.created_at)}; threshold in force <b>{artifact.threshold:.6f}</b> "
        f"for target FPR {artifact.target_fpr:g}. Clean images: {artifact.data.get('selected')} selected "
        f"({artifact.data.get('clean_fit')} fit, {artifact.data.get('clean_threshold', 0)} threshold, "
        f"{artifact.data.get('clean_held_out')} held-out, {artifact.data.get('clean_mixed', 0)} mixing splits) of "
        f"{artifact.data.get('candidates')} candidates from {artifact.data.get('sources')} sources; origin: "
        f"{html.escape(str(artifact.data.get('origin')))}.</p>",
        sample_size_table(artifact),
        "<h2>Operating points</h2><p class='note'>Three splits of the clean images by originals (photos, files, "
        "corpus cut-outs and backgrounds): what is refitted (combiner, learned signals) is fitted on the fit split; "
        "the threshold is the (1 − target) quantile of the clean scores of the threshold split (of the fit and "
        "threshold splits together when nothing is refitted: nothing was fitted on either); the realized FPR is "
        "measured on the held-out split, from originals no fit and no threshold saw, with its exact "
        "(Clopper–Pearson) 95 % interval. Compare it with the target.</p>",
        _html_table(["target FPR", "threshold", "set on", "FPR on the rows that set it",
                     "realized held-out FPR [exact 95 %] (false positives / clean)", "held-out sources"], points),
        "<h2>Per attack</h2><p class='note'>Positives are successful adversarials only; clean: the held-out split. "
        "AUC: 95 % bootstrap interval resampling whole sources, or \"not meaningful\" with fewer than 10 sources on a "
        "side. TPR at the threshold: exact (Clopper–Pearson) 95 % interval. TPR at 1/5/10 % FPR: bootstrap over images "
        "(too narrow when there are few sources). Sizes: median over successful adversarials, L∞ in 8-bit "
        "gray levels, L2 in [0,1] pixel units, L0 in pixels. Queries: per attacked image (black box with probing).</p>",
        _html_table(list(TABLE_COLUMNS), table_rows(artifact)),
        "<h2>ROC curves</h2>", f"<img src='{roc_figure(result, labels)}'>",
        "<h2>Score distributions</h2>", f"<img src='{histogram_figure(result, labels)}'>",
        "<h2>Examples</h2>",
        f"<img src='{examples}'>" if examples else "<p class='note'>No successful adversarial in the example chunks.</p>",
        "<h2>Settings used</h2>", f"<pre>{html.escape(json.dumps(settings, indent=2, sort_keys=True, default=str))}</pre>",
        "</body></html>",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
