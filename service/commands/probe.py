"""``advsentry probe``: local isotropy, symmetry, Mantel and Lipschitz probes on clean vs adversarial inputs.

Images come from a directory (``--images``), the bundled photos
(``--bundled``) or the corpus's **dev** part (``--corpus-dev N``: the first N
dev images by id, never the test part; the corpus loader refuses images from
reserved packages). Adversarials are made with the
repository's attack generators on the bundled EfficientNet-Lite0 (labels = its
own top-1, 8-bit quantized); only successful adversarials are probed. The
report (``probe.json`` + ``index.html``) gives every probe's distribution per
group and its AUC as a detection signal with a bootstrap interval
(:mod:`detector.probe`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .exits import EXIT_USAGE, EXIT_INPUT_ERROR, fail

#: Bar for "useful detection signal": the bootstrap interval's far end from 0.5 (AUC or 1 − AUC).
USEFUL_SEPARATION = 0.75
#: Fewest clean and adversarial values per probe before the report calls a probe useful or not.
MIN_GROUP = 10


def _images(images: Optional[Path], bundled: bool, corpus_dev: int, limit: Optional[int]):
    import numpy as np

    from detector.samples import full_photo_samples, load_image_file

    named: list[tuple[str, np.ndarray]] = []
    if images is not None:
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
        for path in files:
            named.append((path.name, load_image_file(path)))
    if bundled:
        named.extend((f"bundled:{s.name}", s.pixels()) for s in full_photo_samples())
    if corpus_dev:
        from detector.corpus import load_corpus

        for image in sorted(load_corpus().split("dev"), key=lambda image: image.id)[:corpus_dev]:
            named.append((f"corpus-dev:{image.id}", image.pixels()))
    return named[:limit] if limit else named


def conclusion(attacks: dict) -> str:
    """One sentence: which probes separate clean from adversarial (bootstrap interval beyond the bar)."""
    from detector.probe import PROBES

    useful: list[str] = []
    too_few = False
    for attack, data in attacks.items():
        for probe, auc in data["auc"].items():
            if probe not in PROBES:  # baselines are context, not candidates
                continue
            if auc["auc"] is None or min(auc["clean"], auc["adversarial"]) < MIN_GROUP:
                too_few = True
                continue
            # the interval's end nearest 0.5, as a separation (AUC or 1 - AUC); 0.5 when it straddles 0.5
            worst = auc["low"] if auc["low"] > 0.5 else (1.0 - auc["high"] if auc["high"] < 0.5 else 0.5)
            if worst >= USEFUL_SEPARATION:
                useful.append(f"{probe} on {attack} (AUC {auc['auc']:.2f} [{auc['low']:.2f}, {auc['high']:.2f}])")
    caveat = f" (some groups have fewer than {MIN_GROUP} values: not judged)" if too_few else ""
    if not useful:
        return (f"no probe separates clean from adversarial inputs with a bootstrap interval beyond "
                f"{USEFUL_SEPARATION:.2f} (AUC or 1 − AUC) on these inputs" + caveat)
    return f"useful (interval beyond {USEFUL_SEPARATION:.2f}): " + "; ".join(useful) + caveat


def probe(
    images: Annotated[Optional[Path], typer.Option(help="Directory of clean images.")] = None,
    bundled: Annotated[bool, typer.Option("--bundled", help="Probe the bundled sample photos.")] = False,
    corpus_dev: Annotated[int, typer.Option(help="Probe the first N images of the corpus's dev part.")] = 0,
    attack: Annotated[Optional[list[str]], typer.Option(help="Attack(s) to compare with (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for probe.json, index.html and distributions.png.")] = Path(
        "probe"),
    radius: Annotated[float, typer.Option(help="L2 norm of the probe directions (pixels in [0, 1]).")] = 1.0,
    directions: Annotated[int, typer.Option(min=2, help="Random ± directions per input.")] = 8,
    neighbours: Annotated[int, typer.Option(min=3, help="Neighbourhood points per input (Mantel).")] = 10,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Probe at most this many clean images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the directions and the attacks.")] = 0,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Probe the bundled model's local isotropy, symmetry, Mantel correlation and Lipschitz estimate.

    Compares clean inputs with their adversarials per attack (default fgsm and
    pgd_linf) and says whether any probe is a useful detection signal.
    """

    if images is None and not bundled and not corpus_dev:
        fail("give --images DIR, --bundled or --corpus-dev N", EXIT_USAGE)
    if images is not None and not images.is_dir():
        fail(f"{images}: not a directory", EXIT_INPUT_ERROR)

    import torch

    from detector.attacks import make_attack
    from detector.models import load_bundled_model
    from detector.probe import ProbeConfig, auc_with_interval, confidence_correlation, probe_images, summarize
    from detector.probe.report import write_probe_report
    from detector.samples import to_tensor

    try:
        named = _images(images, bundled, corpus_dev, limit)
    except (OSError, ValueError) as error:
        fail(f"{error}", EXIT_INPUT_ERROR)
    if len(named) < 2:
        fail("need at least two images", EXIT_INPUT_ERROR)
    began = time.time()
    config = ProbeConfig(radius=radius, directions=directions, neighbours=neighbours, seed=seed)
    model = load_bundled_model(device)
    pixels = to_tensor([array for _, array in named]).to(device)
    with torch.no_grad():
        labels = torch.cat([model(pixels[i : i + 16]).argmax(1) for i in range(0, len(pixels), 16)])
    clean_values = probe_images(model, pixels, config)
    report: dict = {
        "config": config.to_dict(),
        "images": str(images) if images else ("bundled photos" if bundled else f"corpus dev, first {corpus_dev}"),
        "device": device,
        "clean": [{"image": name, "label": int(label), "probes": values}
                  for (name, _), label, values in zip(named, labels.tolist(), clean_values)],
        "attacks": {},
    }
    for name in attack or ["fgsm", "pgd_linf"]:
        result = make_attack(name, model, seed=seed, quantize=True)(pixels, labels)
        success = result.success.cpu()
        adversarial = result.adversarial[success.to(result.adversarial.device)]
        values = probe_images(model, adversarial, config) if len(adversarial) else []
        kept = [i for i, ok in enumerate(success.tolist()) if ok]
        report["attacks"][name] = {
            "params": result.attack.get("params", {}),
            "attempted": len(named),
            "succeeded": len(kept),
            "adversarial": [{"image": named[i][0], "label_after": int(result.labels_after[i]), "probes": v}
                            for i, v in zip(kept, values)],
        }
        typer.echo(f"{name}: {len(kept)}/{len(named)} adversarials probed", err=True)
    report["summary"] = {"clean": summarize(clean_values)}
    for name, data in report["attacks"].items():
        adv_values = [r["probes"] for r in data["adversarial"]]
        report["summary"][name] = summarize(adv_values)
        data["auc"] = {probe_name: auc_with_interval([v[probe_name] for v in clean_values],
                                                     [v[probe_name] for v in adv_values], seed=seed)
                       for probe_name in report["summary"]["clean"]}
    pooled = clean_values + [r["probes"] for data in report["attacks"].values() for r in data["adversarial"]]
    report["spearman_with_top1_probability"] = confidence_correlation(pooled)
    report["conclusion"] = conclusion(report["attacks"])
    report["seconds"] = time.time() - began
    page = write_probe_report(report, out)
    typer.echo(report["conclusion"])
    typer.echo(f"wrote {page}")


def register(app: typer.Typer) -> None:
    app.command("probe")(probe)
