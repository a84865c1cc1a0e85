"""Writing an adversarial set to disk: 8-bit PNGs plus a ``manifest.json``.

The manifest carries everything a calibration job needs to trust the set
without re-running the attack: per image the files, source name, labels
before/after (with class names), success, norms and queries; for the set the
attack's name, params, seed, quantization and the library versions used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from detector.attacks.base import AttackResult
from detector.attacks.common import is_on_grid

MANIFEST_NAME = "manifest.json"
_LIBRARIES = ("torch", "torchattacks", "adversarial-robustness-toolbox", "numpy", "scipy")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries attacks are built on."""
    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def to_uint8(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> ``uint8 [B, H, W, 3]`` (round to nearest)."""
    array = images.detach().float().clamp(0.0, 1.0).mul(255.0).round().cpu().numpy().astype(np.uint8)
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def _value(tensor: Tensor | None, index: int) -> Any:
    if tensor is None:
        return None
    item = tensor[index].item()
    return bool(item) if isinstance(item, bool) else item


def save_adversarial_set(
    out_dir: str | Path,
    names: Sequence[str],
    clean: Tensor,
    result: AttackResult,
    class_names: Sequence[str],
) -> Path:
    """Write ``adv/NNNN_name.png``, ``clean/NNNN_name.png`` and ``manifest.json``; returns the manifest path.

    Fooling images get no ``clean/`` files (their inputs only gave the shape).

    The PNGs are 8-bit. When the attack ran without ``quantize`` the
    manifest's success and norms describe the float adversarials, and
    ``png_on_grid_before_saving`` is false for images that rounding changed.
    """
    out = Path(out_dir)
    if len(names) != clean.shape[0] or clean.shape[0] != result.adversarial.shape[0]:
        raise ValueError(f"{len(names)} names, {clean.shape[0]} clean and {result.adversarial.shape[0]} adversarial images")
    (out / "adv").mkdir(parents=True, exist_ok=True)
    # Fooling images have no clean counterpart: the inputs only gave the shape.
    has_clean = result.attack.get("family") != "fooling"
    if has_clean:
        (out / "clean").mkdir(parents=True, exist_ok=True)
    adversarial_pixels, clean_pixels = to_uint8(result.adversarial), to_uint8(clean)
    on_grid = is_on_grid(result.adversarial)

    def label(index: int) -> dict[str, Any]:
        return {"index": int(index), "name": class_names[int(index)] if 0 <= int(index) < len(class_names) else None}

    images = []
    for i, source in enumerate(names):
        stem = f"{i:04d}_{_safe(source)}.png"
        Image.fromarray(adversarial_pixels[i]).save(out / "adv" / stem)
        if has_clean:
            Image.fromarray(clean_pixels[i]).save(out / "clean" / stem)
        entry: dict[str, Any] = {
            "file": f"adv/{stem}",
            "clean_file": f"clean/{stem}" if has_clean else None,
            "source": source,
            "label_before": label(result.labels_before[i]),
            "label_after": label(result.labels_after[i]),
            "success": bool(result.success[i]),
            "norms": {key: float(value[i]) for key, value in result.norms.items()},
            "queries": _value(result.queries, i),
            "confidence": _value(result.confidence, i),
            "png_on_grid_before_saving": bool(on_grid[i]),
        }
        if result.target_labels is not None:
            entry["target"] = label(result.target_labels[i])
            entry["target_confidence"] = _value(result.target_confidence, i)
        images.append(entry)
    manifest = {
        "attack": result.attack,
        "libraries": library_versions(),
        "count": len(images),
        "success_rate": result.success_rate,
        "images": images,
    }
    path = out / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    """Params may hold tuples, numpy scalars or tensors; write them as plain JSON."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} to the manifest")
