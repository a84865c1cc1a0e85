"""The probe report: ``probe.json`` (every number) and a self-contained ``index.html`` with the distributions.

One figure (``distributions.png``) shows each probe's values on clean inputs
and on the adversarials of every attack side by side; the tables give medians,
quartiles and the AUC of each probe as a detection signal with its bootstrap
interval.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from .run import PROBES, REPORTED

DPI = 72


def save_distribution_figure(path: Path, report: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"clean": [r["probes"] for r in report["clean"]]}
    for attack, data in report["attacks"].items():
        groups[attack] = [r["probes"] for r in data["adversarial"]]
    columns = 4
    rows = (len(PROBES) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows), layout="constrained")
    palette = ["#4c72b0", "#dd8452", "#c44e52", "#55a868", "#8172b3", "#937860"]
    for axis, probe in zip(axes.flat, PROBES):
        data = [[v[probe] for v in values if np.isfinite(v[probe])] for values in groups.values()]
        positions = range(1, len(data) + 1)
        parts = axis.boxplot([d if d else [np.nan] for d in data], positions=list(positions), widths=0.6,
                             showfliers=False, patch_artist=True)
        for patch, color in zip(parts["boxes"], palette):
            patch.set_facecolor(color)
            patch.set_alpha(0.35)
        rng = np.random.default_rng(0)
        for position, values, color in zip(positions, data, palette):
            axis.scatter(position + rng.uniform(-0.18, 0.18, len(values)), values, s=7, color=color, alpha=0.8)
        axis.set_xticks(list(positions), list(groups), fontsize=7, rotation=20)
        axis.set_title(probe, fontsize=9)
        if probe.startswith("lipschitz"):
            axis.set_yscale("log")
        axis.tick_params(axis="y", labelsize=7)
    for axis in list(axes.flat)[len(PROBES):]:
        axis.axis("off")
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    from PIL import Image

    with Image.open(path) as image:
        quantized = image.convert("RGB").quantize(colors=64)
    quantized.save(path, optimize=True)
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e3 or (value != 0 and abs(value) < 1e-2) else f"{value:.{digits}f}"
    return html.escape(str(value))


def render_html(report: dict[str, Any], figure: Path, title: str) -> str:
    config = report["config"]
    summary_rows = []
    for probe in REPORTED:
        cells = [f"<td>{probe}</td>"]
        for group in ["clean", *report["attacks"]]:
            s = report["summary"][group][probe]
            cells.append(f"<td>{_fmt(s.get('median'))} [{_fmt(s.get('q1'))}, {_fmt(s.get('q3'))}]</td>")
        summary_rows.append("<tr>" + "".join(cells) + "</tr>")
    auc_rows = []
    correlation = report.get("spearman_with_top1_probability", {})
    for probe in REPORTED:
        label = f"{probe} (baseline)" if probe not in PROBES else probe
        cells = [f"<td>{label}</td>", f"<td>{_fmt(correlation.get(probe))}</td>" if probe in PROBES else "<td>–</td>"]
        for attack, data in report["attacks"].items():
            a = data["auc"][probe]
            cells.append(f"<td>{_fmt(a['auc'])} [{_fmt(a['low'])}, {_fmt(a['high'])}]</td>")
        auc_rows.append("<tr>" + "".join(cells) + "</tr>")
    attack_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(json.dumps(data['params']))}</td>"
        f"<td>{data['attempted']}</td><td>{data['succeeded']}</td></tr>"
        for name, data in report["attacks"].items())
    head = "".join(f"<th>{html.escape(g)}</th>" for g in ["clean", *report["attacks"]])
    auc_head = "".join(f"<th>{html.escape(a)}</th>" for a in report["attacks"])
    image = base64.b64encode(figure.read_bytes()).decode()
    verdict = html.escape(report.get("conclusion", ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;font-size:.9em}}
th{{background:#f4f4f4}}h2{{font-size:1.15em;border-bottom:1px solid #ddd}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Local properties of the model around {len(report['clean'])} clean inputs ({html.escape(report['images'])}) and
their adversarials (Aghdam, Heravi &amp; Puig 2017). Per input: {config['directions']} random ± directions of L2 norm
{config['radius']} (isotropy = coefficient of variation of the output changes, asymmetry = mean
|Δ⁺ − Δ⁻| / (Δ⁺ + Δ⁻), local Lipschitz = max ‖Δf‖ / ‖d‖), and {config['neighbours']} neighbours at radii up to
{config['radius']} (Mantel r between input and output distance matrices, scikit-bio). Each on the logits and on
the softmax. Inputs are not clipped to [0, 1] (clipping would break the ± pairs).</p>
<h2>Attacks</h2><table><tr><th>attack</th><th>params</th><th>attempted</th><th>succeeded (probed)</th></tr>
{attack_rows}</table>
<h2>Distributions</h2><img src="data:image/png;base64,{image}" alt="distributions">
<h2>Median [quartiles]</h2><table><tr><th>probe</th>{head}</tr>{''.join(summary_rows)}</table>
<h2>As a detection signal: AUC (adversarial vs clean) [95% bootstrap interval]</h2>
<p>AUC &gt; 0.5: higher on adversarials; &lt; 0.5: lower. A useful signal's interval stays well away from 0.5.</p>
<p>ρ: Spearman correlation of the probe with the model's top-1 probability over all probed inputs (clean and
adversarial); near ±1 the probe mostly restates the confidence, which the detector's logit signals already use.
The baseline row is the top-1 probability itself.</p>
<table><tr><th>probe</th><th>ρ with top-1 p</th>{auc_head}</tr>{''.join(auc_rows)}</table>
<p><b>Conclusion:</b> {verdict}</p>
<p>Time: {report.get('seconds', 0):.0f} s on {html.escape(report.get('device', 'cpu'))}.</p>
</body></html>
"""


def write_probe_report(report: dict[str, Any], out_dir: Path, title: str = "advsentry probe report") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "probe.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    figure = save_distribution_figure(out_dir / "distributions.png", report)
    page = out_dir / "index.html"
    page.write_text(render_html(report, figure, title))
    return page
