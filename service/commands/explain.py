"""``advsentry explain``: why was this input flagged? One self-contained HTML page per input.

For an image file, or for a request the sidecar captured (``--capture DIR --id
ID``, see :mod:`service.hooks.capture`): the score and each signal's share, the
paper's feature response and local entropy map, CAM of the top-1 class and the
runner-up, and the promotion–suppression analysis against a clean reference
(``--reference``) or, without one, against a denoised estimate (labelled as
such). The computation is :func:`detector.explain.explain_input`; the page is
:func:`detector.explain.write_explanation`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .exits import EXIT_USAGE, EXIT_CALIBRATION_ERROR, EXIT_INPUT_ERROR, fail



def _captured_pixels(capture: Path, record_id: str, index: Optional[int], input_name: Optional[str]):
    """``(pixels [3, H, W], item index, record)`` of a captured request."""
    import numpy as np
    import torch

    from service.hooks.capture import load_captured

    if not capture.is_dir():
        fail(f"{capture}: no such capture directory", EXIT_INPUT_ERROR)
    try:
        record = load_captured(capture, record_id)
    except (KeyError, ValueError) as error:
        fail(str(error.args[0] if error.args else error), EXIT_INPUT_ERROR)
    names = list(record.inputs)
    name = input_name or ("pixels" if "pixels" in names else (names[0] if len(names) == 1 else None))
    if name is None or name not in record.inputs:
        fail(f"captured request has inputs {names}; choose one with --input", EXIT_INPUT_ERROR)
    array = record.inputs[name]
    if array.ndim != 4 or array.shape[1] != 3 or not np.issubdtype(array.dtype, np.floating):
        fail(f"input {name!r} has shape {list(array.shape)} {array.dtype}: explain needs [B, 3, H, W] float "
              "pixels in [0, 1] (the bundled model's input)", EXIT_INPUT_ERROR)
    flags = record.flags
    if index is None:
        index = next((i for i, flag in enumerate(flags) if flag), 0)
    if not 0 <= index < array.shape[0]:
        fail(f"--index {index}: the request has {array.shape[0]} input(s)", EXIT_INPUT_ERROR)
    return torch.from_numpy(np.ascontiguousarray(array[index])).float(), index, record


def explain(
    image: Annotated[Optional[Path], typer.Argument(help="Image file to explain (any format PIL reads).",
                                                    show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Directory for index.html, the PNGs and explanation.json.")] = Path(
        "explanation"),
    reference: Annotated[Optional[Path], typer.Option(
        help="The clean image the input was made from (promotion–suppression analysis); without it a "
             "median-filtered copy of the input is used as an estimate, and labelled as such.")] = None,
    calibration: Annotated[Optional[str], typer.Option(
        help="Calibration artifact (JSON) or a shipped detector's name; default: the shipped default.")] = None,
    capture: Annotated[Optional[Path], typer.Option(help="Capture ring directory of a sidecar (capture_dir).")] = None,
    record_id: Annotated[Optional[str], typer.Option("--id", help="Request / trace id of a captured request.")] = None,
    index: Annotated[Optional[int], typer.Option(help="Which input of a captured batch (default: first flagged).")] = None,
    input_name: Annotated[Optional[str], typer.Option("--input", help="Captured input tensor holding the pixels.")] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the explanation's numbers as JSON.")] = False,
) -> None:
    """Explain one input's verdict: signal shares, feature response, CAM, promotion vs suppression.

    Give IMAGE, or --capture DIR --id ID for a request the sidecar captured
    (then the score is recomputed and compared with the one the sidecar gave).
    Writes OUT/index.html (self-contained). Exit codes: 0 ok, 2 usage, 3 bad
    image or capture, 4 bad calibration artifact.
    """

    if (image is None) == (capture is None):
        fail("give an IMAGE or --capture DIR --id ID (not both)", EXIT_USAGE)
    if capture is not None and not record_id:
        fail("--capture needs --id (the request / trace id)", EXIT_USAGE)

    from detector import CalibrationError, Detector
    from detector.explain import explain_input, write_explanation
    from detector.models import bundled_identity
    from detector.samples import load_image_file, to_tensor

    try:
        detector = Detector.from_spec(calibration or "default", model_identity=bundled_identity(), device=device)
    except (CalibrationError, FileNotFoundError, ValueError) as error:
        fail(str(error), EXIT_CALIBRATION_ERROR)

    source: dict[str, object] = {}
    if capture is not None:
        pixels, item, record = _captured_pixels(capture, record_id, index, input_name)  # type: ignore[arg-type]
        meta = record.metadata
        source = {"captured request": record.id, "input index": item, "model": meta.get("model"),
                  "captured at (unix s)": meta.get("time"), "score the sidecar gave": meta["scores"][item],
                  "sidecar calibration": meta.get("calibration_id")}
        title = f"advsentry explanation: captured request {record.id}"
        if meta.get("calibration_id") not in (None, detector.calibration_id):
            typer.echo(f"warning: the sidecar scored with calibration {meta.get('calibration_id')}, this uses "
                       f"{detector.calibration_id}; pass the same --calibration to reproduce its score", err=True)
    else:
        try:
            pixels = to_tensor([load_image_file(image)])[0]  # type: ignore[arg-type]
        except (FileNotFoundError, ValueError) as error:
            fail(str(error), EXIT_INPUT_ERROR)
        source = {"image": str(image)}
        title = f"advsentry explanation: {image.name}"  # type: ignore[union-attr]
    clean = None
    if reference is not None:
        try:
            clean = to_tensor([load_image_file(reference, size=int(pixels.shape[-1]))])[0]
        except (FileNotFoundError, ValueError) as error:
            fail(str(error), EXIT_INPUT_ERROR)
        source["reference"] = str(reference)

    explanation = explain_input(detector, pixels, clean, source=source)
    page = write_explanation(explanation, out, title)
    summary = explanation.to_dict()
    summary["page"] = str(page)
    if capture is not None:
        summary["captured_score"] = source["score the sidecar gave"]
        summary["score_difference"] = explanation.score - float(source["score the sidecar gave"])  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(summary, default=float))
    else:
        verdict = {None: "-", True: "ADVERSARIAL", False: "clean"}[explanation.adversarial]
        typer.echo(f"score={explanation.score:.4f} verdict={verdict} top-1={explanation.top(1)[0][0]} "
                   f"pse={explanation.pse.category} (reference: {explanation.reference_kind})")
        if capture is not None:
            typer.echo(f"sidecar score={summary['captured_score']:.4f} (difference {summary['score_difference']:+.2e})")
        typer.echo(f"wrote {page}")


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
