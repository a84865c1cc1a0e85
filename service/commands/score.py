"""``advsentry score``: classify images and print their entropy score and verdict."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer


from .exits import EXIT_CALIBRATION_ERROR, EXIT_INPUT_ERROR, EXIT_USAGE, fail

def score(
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files (any format PIL reads).", show_default=False)] = None,
    bundled: Annotated[bool, typer.Option("--bundled", help="Score the sample photos that ship inside installed packages.")] = False,
    calibration: Annotated[Optional[str], typer.Option(
        help="Calibration artifact (JSON) or a shipped detector's name (default, fixed-signals, entropy-9photo, "
             "paper: no threshold); it configures the signals, combiner and threshold.")] = None,
    save_maps: Annotated[Optional[Path], typer.Option(help="Write input | feature response | local entropy PNGs here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image instead of text.")] = False,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batched detector call.")] = 16,
) -> None:
    """Classify IMAGES with the bundled EfficientNet-Lite0 and print each one's score.

    Per image: top-1 class and probability, average local spatial entropy score,
    verdict (with --calibration) and time. Exit codes: 0 ok, 2 usage, 3 bad
    image, 4 bad calibration artifact.
    """
    if not images and not bundled:
        fail("give image files or --bundled", EXIT_USAGE)

    from detector import CalibrationError, Detector
    from detector.models import imagenet_class_names
    from detector.samples import full_photo_samples, load_image_file, to_tensor

    named: list[tuple[str, object]] = []
    for path in images or []:
        try:
            named.append((str(path), load_image_file(path)))
        except (FileNotFoundError, ValueError) as error:
            fail(str(error), EXIT_INPUT_ERROR)
    if bundled:
        named.extend((f"bundled:{sample.name}", sample.pixels()) for sample in full_photo_samples())

    from detector.models import bundled_identity

    try:
        detector = Detector.from_spec(calibration or "default", model_identity=bundled_identity(), device=device)
    except CalibrationError as error:
        fail(str(error), EXIT_CALIBRATION_ERROR)
    class_names = imagenet_class_names()

    import torch

    from detector.visualize import save_response_figure

    if save_maps is not None:
        save_maps.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(named), batch_size):
        chunk = named[start : start + batch_size]
        pixels = to_tensor([array for _, array in chunk])  # type: ignore[misc]
        began = time.perf_counter()
        maps, logits = detector.maps_and_logits(pixels)
        values = detector.entropies(maps)
        scores = detector.combiner.combine(values)
        # Why a verdict: each signal's value and, for a fitted combiner, its share of the score.
        contributions = detector.combiner.contributions(values.numpy()) if hasattr(detector.combiner, "contributions") else None
        elapsed_ms = (time.perf_counter() - began) * 1000.0 / len(chunk)
        probabilities = torch.softmax(logits, dim=1)
        top_p, top_i = probabilities.max(dim=1)
        verdicts = detector.verdict(scores) if detector.threshold is not None else None
        for row, (name, _) in enumerate(chunk):
            record = {
                "image": name,
                "label": class_names[int(top_i[row])],
                "class_index": int(top_i[row]),
                "probability": round(float(top_p[row]), 6),
                "score": round(float(scores[row]), 6),
                "adversarial": bool(verdicts[row]) if verdicts is not None else None,
                "threshold": detector.threshold,
                "calibration": detector.calibration_id,
                "time_ms": round(elapsed_ms, 2),
                "signals": {feature: round(float(values[row, i]), 6) for i, feature in enumerate(detector.features)},
            }
            if contributions is not None:
                record["contributions"] = {feature: round(float(contributions[row, i]), 6)
                                           for i, feature in enumerate(detector.features)}
            if save_maps is not None:
                stem = Path(name.replace("bundled:", "")).stem
                record["maps"] = str(save_response_figure(
                    save_maps / f"{stem}.png", pixels[row], {k: v[row] for k, v in maps.items()}, detector.features,
                    record.get("contributions") or record["signals"],
                ))
            if as_json:
                typer.echo(json.dumps(record))
            else:
                verdict = "-" if record["adversarial"] is None else ("ADVERSARIAL" if record["adversarial"] else "clean")
                typer.echo(
                    f"{name}: {record['label']} (p={record['probability']:.3f})  "
                    f"score={record['score']:.4f}  verdict={verdict}  {record['time_ms']:.0f} ms"
                )
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("score")(score)
