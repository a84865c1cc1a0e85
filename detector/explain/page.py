"""The explanation page: PNG figures (matplotlib) and one self-contained HTML file embedding them.

``write_explanation(explanation, out_dir)`` writes ``response.png`` (input,
feature response, local entropy map as in the paper's Figure 3, and each
signal's share of the score: :func:`detector.visualize.save_response_figure`),
``cam.png`` (CAM of the top-1 class and the runner-up), ``pse.png``
(promotion–suppression: CAMs of the true and the adversarial class on the
reference and on the input, and their difference), ``explanation.json`` (the
numbers) and ``index.html``, which embeds the PNGs as data URIs so the one file
can be attached to an incident ticket.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import torch

from ..visualize import save_response_figure
from .analysis import ESTIMATE_MEDIAN, Explanation

#: Figure resolution: small PNGs (the page is attached to tickets and committed as a sample).
DPI = 72


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rgb(pixels: torch.Tensor) -> np.ndarray:
    return pixels.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return torch.nn.functional.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False).numpy()


def _label(explanation: Explanation, index: int) -> str:
    name = explanation.class_names[index]
    return name if len(name) <= 22 else name[:21] + "…"


def save_cam_figure(path: Path, explanation: Explanation) -> Path:
    plt = _plt()
    cam = explanation.cam
    size = tuple(explanation.pixels.shape[1:])
    up = _upsample(cam.maps[:1], size)[0]  # type: ignore[arg-type]
    figure, axes = plt.subplots(1, 1 + up.shape[0], figsize=(3.0 * (1 + up.shape[0]), 3.4), layout="constrained")
    image = _rgb(explanation.pixels)
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    p = np.exp(explanation.logits - explanation.logits.max())
    p /= p.sum()
    for j in range(up.shape[0]):
        c = int(cam.classes[0, j])
        axes[j + 1].imshow(image)
        axes[j + 1].imshow(up[j], cmap="jet", alpha=0.5)
        rank = "top-1" if j == 0 else ("runner-up" if j == 1 else f"#{j + 1}")
        axes[j + 1].set_title(f"{cam.method.upper()} {rank}: {_label(explanation, c)}\np={p[c]:.3f}", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return shrink_png(path)


def save_pse_figure(path: Path, explanation: Explanation) -> Path:
    plt = _plt()
    size = tuple(explanation.pixels.shape[1:])
    cams = explanation.pse_cams  # [2 (input, reference), 2 (true, adversarial), h, w]
    up_input = _upsample(cams[0:1], size)[0]  # type: ignore[arg-type]
    up_ref = _upsample(cams[1:2], size)[0]  # type: ignore[arg-type]
    pse = explanation.pse
    reference_name = "reference" if explanation.reference_kind == "given" else "estimated reference (median)"
    figure, axes = plt.subplots(2, 4, figsize=(12.0, 6.6), layout="constrained")
    for row, (cls, what) in enumerate(((pse.true_class, "true"), (pse.adversarial_class, "adversarial"))):
        base = explanation.reference if row == 0 else explanation.pixels
        axes[row, 0].imshow(_rgb(base))
        axes[row, 0].set_title(reference_name if row == 0 else "input", fontsize=9)
        limit = float(max(abs(up_ref[row]).max(), abs(up_input[row]).max(), 1e-9))
        for column, (cam, title) in enumerate(((up_ref[row], reference_name), (up_input[row], "input")), start=1):
            axes[row, column].imshow(cam, cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[row, column].set_title(f"CAM {what} class ({_label(explanation, cls)})\non {title}", fontsize=8)
        difference = up_input[row] - up_ref[row]
        dl = float(max(abs(difference).max(), 1e-9))
        shown = axes[row, 3].imshow(difference, cmap="PuOr_r", vmin=-dl, vmax=dl)
        axes[row, 3].set_title(f"CAM difference (input − reference)\n{what} class", fontsize=8)
        figure.colorbar(shown, ax=axes[row, 3], fraction=0.046)
    for axis in axes.flat:
        axis.axis("off")
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return shrink_png(path)


def shrink_png(path: Path, colors: int = 128) -> Path:
    """Rewrite a PNG with an adaptive palette (about a quarter of the bytes; the figures have few colours)."""
    from PIL import Image

    with Image.open(path) as image:
        quantized = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    quantized.save(path, optimize=True)
    return path


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.92em}
th{background:#f4f4f4}.flag{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;font-size:.92em}
img{max-width:100%}code{background:#f4f4f4;padding:0 .2em}
"""


def render_html(explanation: Explanation, figures: dict[str, Path], title: str = "advsentry explanation") -> str:
    e = explanation
    verdict = e.adversarial
    verdict_html = ("<span class='flag'>ADVERSARIAL</span>" if verdict else "<span class='ok'>clean</span>"
                    if verdict is not None else "– (no threshold)")
    source_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in e.source.items())
    signal_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_fmt(value)}</td>"
        f"<td>{_fmt(e.contributions[name]) if e.contributions else '–'}</td></tr>"
        for name, value in sorted(e.signals.items(), key=lambda kv: -abs((e.contributions or {}).get(kv[0], 0.0)))
    )
    top_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{i}</td><td>{p:.4f}</td><td>{pr:.4f}</td></tr>"
        for (n, i, p), pr in zip(e.top(5), [float(np.exp(e.reference_logits[i] - e.reference_logits.max())
                                                  / np.exp(e.reference_logits - e.reference_logits.max()).sum())
                                            for _, i, _ in e.top(5)])
    )
    pse = e.pse
    if e.reference_kind == "given":
        reference_note = "The reference is the clean image given with <code>--reference</code>."
    else:
        reference_note = (
            f"<div class='note'><b>No clean reference was given.</b> The analysis below uses an <b>estimate</b>: a "
            f"{ESTIMATE_MEDIAN}×{ESTIMATE_MEDIAN} median-filtered copy of the input (Feature Squeezing's denoiser). "
            "It removes part of a small perturbation but is not the clean image: treat the category as a hint. "
            "Give <code>--reference CLEAN_IMAGE</code> for the real analysis.</div>")
    share = "–" if pse.promotion_share is None else f"{pse.promotion_share:.3f}"
    names = e.class_names
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<table>
<tr><th>verdict</th><td>{verdict_html}</td></tr>
<tr><th>score</th><td>{_fmt(e.score)} (threshold {_fmt(e.threshold)})</td></tr>
<tr><th>calibration</th><td>{_fmt(e.calibration_id)}</td></tr>
<tr><th>top-1</th><td>{html.escape(e.top(1)[0][0])} (p={e.top(1)[0][2]:.3f})</td></tr>
{source_rows}
</table>

<h2>1. Signals and the score</h2>
<p>Input, the paper's feature response (guided backprop of the final convolutional layer's activations) as
gray levels, its local entropy map (as in Amirian et al. 2018, Figure 3), and how much each signal pushed the
score (the combiner's terms; the score is their sum plus the bias {_fmt(e.bias)}). Red bars push towards
"adversarial".</p>
{_embed(figures['response'])}
<table><tr><th>signal</th><th>value</th><th>share of the score</th></tr>{signal_rows}</table>

<h2>2. Where the evidence is: class activation maps</h2>
<p>{e.cam.method.upper()} of the top-1 class and the runner-up (layer <code>{html.escape(e.cam.layer)}</code>).
{"CAM is exact here: the model's head is global average pool → linear (checked on this input), so each map's mean plus the class bias is the class logit." if e.cam.method == "cam" else "Grad-CAM: the model's head is not a verified global-average-pool → linear head."}</p>
{_embed(figures['cam'])}
<table><tr><th>class (input top-5)</th><th>index</th><th>p(input)</th><th>p(reference)</th></tr>{top_rows}</table>

<h2>3. Promotion or suppression? (Xu et al. 2019)</h2>
{reference_note}
<table>
<tr><th></th><th>true class: {html.escape(names[pse.true_class])} ({pse.true_class})</th>
<th>adversarial class: {html.escape(names[pse.adversarial_class])} ({pse.adversarial_class})</th></tr>
<tr><th>Δ logit (centred)</th><td>{pse.delta_true_logit:+.3f}</td><td>{pse.delta_adversarial_logit:+.3f}</td></tr>
<tr><th>p on reference → input</th><td>{pse.p_true_reference:.4f} → {pse.p_true_input:.4f}</td>
<td>{pse.p_adversarial_reference:.4f} → {pse.p_adversarial_input:.4f}</td></tr>
<tr><th>suppression S / promotion P</th><td>S = {pse.suppression:.3f}</td><td>P = {pse.promotion:.3f}</td></tr>
<tr><th>category</th><td colspan="2"><b>{html.escape(pse.category)}</b> (promotion share {share})</td></tr>
</table>
<p><b>Rule:</b> {html.escape(pse.rule)}.</p>
<p>CAMs of the true and the adversarial class on the reference and on the input, and their difference
(input − reference): where the perturbation removed evidence for the true class and added evidence for the
adversarial one.</p>
{_embed(figures['pse'])}

<h2>Scope</h2>
<p>Network dissection (Bau et al. 2017), which Xu et al. use to name the units a perturbation affects, is out of
scope: it needs a labelled concept data set (Broden), which does not ship offline.</p>
</body></html>
"""


def write_explanation(explanation: Explanation, out_dir: Path, title: str = "advsentry explanation") -> Path:
    """Write the PNGs, ``explanation.json`` and the self-contained ``index.html``; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shares = explanation.contributions or explanation.signals
    _plt()  # selects the Agg backend before save_response_figure imports pyplot
    figures = {
        "response": shrink_png(save_response_figure(out_dir / "response.png", explanation.pixels,
                                                    explanation.maps, explanation.map_configs, shares)),
        "cam": save_cam_figure(out_dir / "cam.png", explanation),
        "pse": save_pse_figure(out_dir / "pse.png", explanation),
    }
    (out_dir / "explanation.json").write_text(json.dumps(explanation.to_dict(), indent=2, default=float) + "\n")
    page = out_dir / "index.html"
    page.write_text(render_html(explanation, figures, title))
    return page
