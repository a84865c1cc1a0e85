"""``results.md``: the corpus study's tables, generated from ``results.json`` (never edited by hand)."""

from __future__ import annotations

from typing import Any

DETECTORS = (
    ("paper", "paper's method"),
    ("first_study_default", "previous default (9-photo study)"),
    ("feature_squeezing", "Feature Squeezing (5-bit, 2×2 median, max)"),
    ("best_single", "best single signal (dev)"),
    ("chosen", "**chosen detector**"),
    ("unbounded_cost", "chosen without the cost budget"),
)


def _cell(interval: dict[str, float]) -> str:
    value = interval["value"]
    if value != value:  # NaN: no successful adversarial
        return "–"
    return f"{value:.3f} [{interval['low']:.2f}, {interval['high']:.2f}]"


def _by_source(rate: dict) -> str:
    b = rate.get("by_source")
    return f" (by source [{b['low']:.2f}, {b['high']:.2f}])" if b and b.get("low") is not None else ""


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Detection study on the real-photo corpus", "",
             "Generated from `results.json` by `benchmarks/corpus_study/report.py`. Every choice was made on the dev part; "
             "all numbers below are on the **test part** (sources never seen in selection), 95 % bootstrap intervals.", ""]
    data = results["data"]
    lines += [f"Data: {data.get('origin')}; attacked: dev {data['dev']['images']} inputs from {data['dev']['sources']} sources, "
              f"test {data['test']['images']} inputs from {data['test']['sources']} sources"
              + "".join(f"; clean only, besides: {name.split('_')[0]} {info['images']} more inputs"
                        for name, info in data.items() if "_extra" in name)
              + (f" (from `{results['settings']['clean_corpus']}`: every confidence)" if results["settings"].get("clean_corpus") else "")
              + ".", ""]
    selection = results["selection"]
    chosen = selection["chosen"]
    lines += ["## Chosen detector", "",
              "Signals (in order of selection, dev CV mean AUC after each): "
              + ", ".join(f"`{n}` ({v:.3f})" for n, v in chosen["history"]),
              f"; about {chosen['extra_forwards']:.1f} extra forward passes. Trained on: {', '.join(results['seen_attacks'])}; "
              "all other attacks are unseen by the combiner.",
              f"Best single signal on dev: `{selection['best_single']['name']}` (direction {selection['best_single']['direction']:+.0f}, "
              f"mean AUC on seen dev attacks {selection['best_single']['seen_mean_dev_auc']:.3f}).", ""]
    attack_rows = []
    for part in ("test",):
        for name, info in results["attacks"][part].items():
            seen = "seen" if name in results["seen_attacks"] else "unseen"
            paper = " (paper)" if name in results["paper_attacks"] else ""
            attack_rows.append(f"| {results['labels'].get(name, name)}{paper} | {seen} | {info['attempted']} | "
                               f"{info['success_rate']:.2f} | {info['successful']} |")
    lines += ["## Attacks (test part)", "", "| attack | combiner | attempted | success rate | successful (positives) |",
              "|---|---|---|---|---|", *attack_rows, ""]
    for metric, title in (("auc", "AUC"), ("0.01", "TPR at 1 % FPR"), ("0.05", "TPR at 5 % FPR"), ("0.1", "TPR at 10 % FPR")):
        names = [n for n, _ in DETECTORS if n in results["test"]]
        lines += [f"## {title} (test part)", "", "| attack | " + " | ".join(label for n, label in DETECTORS if n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for attack in results["attacks"]["test"]:
            cells = []
            for n in names:
                row = results["test"][n][attack]
                cells.append(_cell(row["auc"] if metric == "auc" else row["tpr"][metric]))
            lines.append(f"| {results['labels'].get(attack, attack)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Threshold transfer: dev-fitted threshold, realized FPR on test clean (Clopper–Pearson 95 %)", "",
              "| detector | target 1 % | target 5 % |", "|---|---|---|"]
    for n, label in DETECTORS:
        if n in results["threshold_transfer"]:
            t = results["threshold_transfer"][n]
            lines.append(f"| {label} | {_cell(t['0.01'])}{_by_source(t['0.01'])} | {_cell(t['0.05'])}{_by_source(t['0.05'])} |")
    lines += ["", "In parentheses: a 95 % interval that redraws whole test sources (inputs of one photo are flagged together, "
              "so the exact binomial interval over inputs is too narrow for the FPR on new sources).", ""]
    protocol = results.get("threshold_protocol")
    if protocol:
        o = protocol["out_of_fold_threshold_on_held"]
        rows = protocol.get("clean_rows")
        excluded = f" ({rows['out']} clean dev inputs that mix held and fitted originals are used for nothing)" if rows else ""
        lines += [f"The fitted detectors' thresholds come from {protocol['held_clean']} clean dev inputs of {protocol['held_sources']} "
                  "sources made only from originals (photos, backgrounds, cut-outs) held out of every fit (learned signals, "
                  f"selection, combiner), scored by the pipeline that ships{excluded}. "
                  f"Dev-only check of the other protocol: a threshold from the other dev sources' out-of-fold scores "
                  f"({protocol['fit_clean']} clean inputs) flags {_cell(o['0.01'])} of the held sources' clean inputs at a 1 % "
                  f"target and {_cell(o['0.05'])} at 5 %.", ""]
    confidence = results.get("confidence")
    if confidence:
        lines += ["## False alarms by the model's confidence (clean test inputs of any confidence)", "",
                  f"{confidence['images']} inputs: {confidence['corpus']}. The study's corpus keeps only probability ≥ 0.3.", "",
                  "FPR at each detector's dev-fitted 5 % threshold (1 % in parentheses):", "",
                  "| top-1 probability | inputs | **chosen detector** | previous default (9-photo study) | Feature Squeezing |",
                  "|---|---|---|---|---|"]
        for band in confidence["bands"]:
            low, high = band["band"]
            cells = [f"{_cell(band[f'{d}@0.05'])} ({band[f'{d}@0.01']['value']:.3f})"
                     for d in ("chosen", "first_study_default", "feature_squeezing")]
            lines.append(f"| [{low:.1f}, {high:.1f}) | {band['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    fooling = results.get("fooling")
    if fooling:
        confidence = sorted(fooling["target_confidence"])
        lines += ["## Fooling images (CPPN, Nguyen et al. 2015)", "",
                  f"{fooling['images']} images evolved towards random classes ({fooling['generations']} generations, "
                  f"population {fooling['population']}, on 2 CPU cores); "
                  f"wanted-class confidence median {confidence[len(confidence) // 2]:.3f}, max {confidence[-1]:.3f}. "
                  "Share flagged at the dev-fitted thresholds:", "",
                  "| detector | at 1 % FPR threshold | at 5 % FPR threshold |", "|---|---|---|"]
        for n, label in DETECTORS:
            if n in fooling["flagged"]:
                lines.append(f"| {label} | {fooling['flagged'][n]['0.01']:.2f} | {fooling['flagged'][n]['0.05']:.2f} |")
        lines.append("")
    adaptive = results.get("adaptive")
    if adaptive:
        lines += ["## Adaptive attack (white box, knows the whole detector)", "", adaptive["method"], "",
                  "| ε | weight λ | inputs | undefended robust accuracy | defended: correct or flagged at the 5 % threshold | attack success (wrong and unflagged) |",
                  "|---|---|---|---|---|---|"]
        for row in adaptive["rows"]:
            lines.append(f"| {row['eps_255']}/255 | {row['weight']} | {row['n']} | {row['undefended_robust_accuracy']:.3f} | "
                         f"{row['correct_or_flagged']:.3f} | {row['evasion_rate']:.3f} |")
        lines += ["", "Worst case over λ per ε (what the detector guarantees): "
                  + ", ".join(f"{e}/255: {v:.3f}" for e, v in adaptive["worst_case"].items()), ""]
    return "\n".join(lines) + "\n"
