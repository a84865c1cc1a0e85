"""The study's outputs: markdown tables in the layout of the paper's Table 1, and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector import ScoreConfig

DETECTORS = (
    ("paper", "(a) paper's method"),
    ("best_single", "(b) best single map"),
    ("combined", "(c) combined (logistic, cost budget)"),
    ("feature_squeezing", "(d) Feature Squeezing"),
    ("combined_unconstrained", "(c′) combined, no cost budget (reference)"),
)


def top_candidates(dev_aucs: dict[str, np.ndarray], names: list[str], count: int) -> list[dict[str, Any]]:
    mean = np.mean(list(dev_aucs.values()), axis=0)
    order = np.argsort(-np.maximum(mean, 1 - mean))[:count]
    return [
        {"name": names[i], "mean_auc": float(mean[i]), **{a: float(v[i]) for a, v in dev_aucs.items()}}
        for i in order
    ]


def _cell(interval: dict[str, float]) -> str:
    if interval["value"] != interval["value"]:  # NaN: no positives
        return "–"
    return f"{interval['value']:.3f} [{interval['low']:.2f}, {interval['high']:.2f}]"


def markdown(results: dict[str, Any]) -> str:
    data, labels = results["data"], results["labels"]
    lines = [
        "# Detection study: results on the test part",
        "",
        f"Clean images: {data['clean_total']} (dev {data['dev']} from {', '.join(data['dev_photos'])}; "
        f"test {data['test']} from {', '.join(data['test_photos'])}). Positives are successful, 8-bit quantized adversarials only. "
        "Intervals: stratified bootstrap 95%. TPR at a FPR is read off the test ROC, as in the paper's Table 1.",
        "",
        f"Default detector chosen on dev: **{results['default_detector']}**. "
        f"Mean dev AUC: paper {results['dev_selection']['mean_dev_auc']['paper']:.3f}, "
        f"best single {results['dev_selection']['mean_dev_auc']['best_single']:.3f}, "
        f"combined within the cost budget (photo-grouped CV) {results['dev_selection']['mean_dev_auc']['combined_cv']:.3f}, "
        f"combined without budget (CV) {results['dev_selection']['mean_dev_auc']['combined_unconstrained_cv']:.3f}. "
        "Cost budget: one forward pass and at most one guided backward pass per request.",
        "",
        "| attack | detector | images (clean/adv) | attack success | TPR@1% | TPR@5% | TPR@10% | AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for attack, label in labels.items():
        info = results["attacks"]["test"][attack]
        for key, title in DETECTORS:
            row = results["test"][key][attack]
            tpr = row["tpr"]
            lines.append(
                f"| {label} | {title} | {row['clean']}/{row['adversarial']} | {info['success_rate']:.3f} ({info['attempted']}) | "
                f"{_cell(tpr['0.01'])} | {_cell(tpr['0.05'])} | {_cell(tpr['0.1'])} | {_cell(row['auc'])} |"
            )
    seen = results["dev_selection"]["combined_seen"]
    lines += [
        "",
        f"## Generalization: combiner trained on {', '.join(seen['trained_on'])} only (dev), tested on every attack",
        "",
        "| attack | seen in training | AUC | TPR@5% |",
        "|---|---|---|---|",
    ]
    for attack, label in labels.items():
        row = results["test"]["combined_seen"][attack]
        lines.append(f"| {label} | {'yes' if attack in seen['trained_on'] else 'no'} | {_cell(row['auc'])} | {_cell(row['tpr']['0.05'])} |")
    selection = results["dev_selection"]
    lines += [
        "",
        "## What was chosen on dev",
        "",
        f"- Best single map: `{selection['best_single']['name']}`, direction {selection['best_single']['direction']:+d} "
        "(+1: adversarial raises the entropy).",
        f"- Combined (cost budget): {', '.join(f'`{n}`' for n in selection['combined']['features'])}; weights "
        f"{', '.join(f'{w:+.2f}' for w in selection['combined']['combiner']['weights'])} on standardized entropies.",
        f"- Combined without budget (reference): {', '.join(f'`{n}`' for n in selection['combined_unconstrained']['features'])}; weights "
        f"{', '.join(f'{w:+.2f}' for w in selection['combined_unconstrained']['combiner']['weights'])}.",
        f"- Held-out FPR on test clean images at the dev threshold for 5% FPR: "
        + ", ".join(f"{k} {v:.3f}" for k, v in results["held_out_fpr_at_dev_threshold_5pct"].items()),
        "",
        "## Top candidates of the family on dev (AUC per attack; <0.5 means the attack lowers the entropy)",
        "",
        "| candidate | mean | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for row in selection["top_candidates"]:
        lines.append(f"| `{row['name']}` | {row['mean_auc']:.3f} | " + " | ".join(f"{row.get(a, float('nan')):.3f}" for a in labels) + " |")
    return "\n".join(lines) + "\n"


def figures(out_dir: Path, results, scores, model, test_clean, test_attacks, best_config: ScoreConfig, direction: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detector.evaluation import roc

    labels = results["labels"]
    attacks = [a for a in labels if len(scores["paper"][a])]
    cols = min(4, len(attacks))
    rows = int(np.ceil(len(attacks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False)
    for axis, attack in zip(axes.flat, attacks):
        for key, title in DETECTORS:
            fpr, tpr = roc(scores[key]["clean"], scores[key][attack])
            axis.plot(fpr, tpr, label=title)
        axis.plot([0, 1], [0, 1], ":", color="gray")
        axis.set_title(labels[attack])
        axis.set_xlabel("FPR")
        axis.set_ylabel("TPR")
    for axis in axes.flat[len(attacks):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc_test.png", dpi=80)
    plt.close(fig)

    default = results["default_detector"]
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for axis, attack in zip(axes.flat, attacks):
        for key, color in (("paper", "tab:gray"), (default, "tab:blue")):
            axis.hist(scores[key]["clean"], bins=30, alpha=0.5, density=True, color=color, label=f"{key} clean")
            axis.hist(scores[key][attack], bins=30, alpha=0.5, density=True, histtype="step", color=color, label=f"{key} adv")
        axis.set_title(labels[attack], fontsize=9)
    for axis in axes.flat[len(attacks):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "score_histograms_test.png", dpi=80)
    plt.close(fig)

    # Example: one test image, clean vs an attack, with the paper's map and the best map.
    from detector import PAPER_CONFIG
    from detector.entropy import gray_levels, local_entropy_map
    from detector.features import extract_maps

    attack = next((a for a in ("pgd_linf_2", "fgsm_2", "fgsm_8") if a in test_attacks and len(test_attacks[a]["index"])), None)
    if attack is None:
        return
    index = int(test_attacks[attack]["index"][0])
    clean = test_clean.pixels[index : index + 1]
    adversarial = test_attacks[attack]["adversarial"][:1].float().div(255.0)
    configs = {"paper": PAPER_CONFIG, "best": best_config}
    fig, axes = plt.subplots(2, 5, figsize=(17, 7))
    for row, (title, pixels) in enumerate((("clean", clean), (labels[attack], adversarial))):
        maps, _ = extract_maps(model, pixels, configs)
        axes[row, 0].imshow(pixels[0].permute(1, 2, 0).numpy())
        axes[row, 0].set_title(title)
        column = 1
        for key, config in configs.items():
            levels = gray_levels(maps[key], config)
            entropy = local_entropy_map(levels, config)[0]
            axes[row, column].imshow(levels[0].numpy(), cmap="gray")
            axes[row, column].set_title(f"{key} map", fontsize=8)
            axes[row, column + 1].imshow(entropy.numpy(), cmap="inferno", vmin=0)
            axes[row, column + 1].set_title(f"{key} entropy, mean {entropy.mean():.3f}", fontsize=8)
            column += 2
    for axis in axes.flat:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "example_test.png", dpi=70)
    plt.close(fig)
