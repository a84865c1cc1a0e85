"""``advsentry attack``: generate an adversarial set (PNGs + manifest) with one attack.

The set calibrates or evaluates the detector. Clean images have no ground
truth here, so each one's label is the model's own clean prediction; an
untargeted attack succeeds when it changes that prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from .exits import EXIT_USAGE, EXIT_INPUT_ERROR, fail

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}



def _parse_value(text: str) -> Any:
    """``--param`` values: JSON when it parses (numbers, lists, true/null), else the string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _image_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()))
        else:
            files.append(path)
    return files


def attack(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Image files or folders.", show_default=False)] = None,
    attack_name: Annotated[str, typer.Option("--attack", help="Attack name (see --list).", show_default=False)] = "",
    images: Annotated[Optional[list[Path]], typer.Option("--images", help="Image files or folders (repeatable).")] = None,
    bundled: Annotated[bool, typer.Option("--bundled", help="Use the photos that ship inside installed packages.")] = False,
    count: Annotated[int, typer.Option(min=1, help="With --bundled: number of images (random crops beyond 10).")] = 10,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder for PNGs and manifest.json.")] = None,
    eps: Annotated[Optional[float], typer.Option(help="Perturbation budget (attacks that have one).")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="Attack parameter KEY=VALUE (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quantize: Annotated[bool, typer.Option("--quantize/--no-quantize", help="Round adversarials to 8 bits.")] = True,
    targeted: Annotated[bool, typer.Option("--targeted", help="Targeted variant (needs --target-class).")] = False,
    target_class: Annotated[Optional[int], typer.Option(help="Target ImageNet class index (targeted, fooling).")] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per attack call.")] = 16,
    list_attacks: Annotated[bool, typer.Option("--list", help="List attacks and their default params, then exit.")] = False,
) -> None:
    """Attack images with the bundled EfficientNet-Lite0 and write an adversarial set to --out.

    Exit codes: 0 ok, 2 usage, 3 bad image.
    """
    from detector.attacks import ATTACKS

    if list_attacks:
        for name, cls in ATTACKS.items():
            typer.echo(f"{name:15s} {cls.family:18s} {cls.library}  defaults={dict(cls.defaults)}")
        raise typer.Exit(0)
    if attack_name not in ATTACKS:
        fail(f"--attack must be one of: {', '.join(ATTACKS)}", EXIT_USAGE)
    if out is None:
        fail("--out is required", EXIT_USAGE)
    if not images and not paths and not bundled:
        fail("give image files or folders (arguments or --images) or --bundled", EXIT_USAGE)
    cls = ATTACKS[attack_name]
    fooling = cls.labels_are_targets
    if (targeted or fooling) and target_class is None:
        fail(f"{attack_name}{'' if fooling else ' --targeted'} needs --target-class", EXIT_USAGE)

    params: dict[str, Any] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--param expects KEY=VALUE, got {item!r}", EXIT_USAGE)
        params[key.strip()] = _parse_value(value)
    if eps is not None:
        params["eps"] = eps


    from detector.samples import full_photo_samples, load_image_file, random_crops

    named: list[tuple[str, Any]] = []
    for path in _image_files(list(paths or []) + list(images or [])):
        try:
            named.append((str(path), load_image_file(path)))
        except (FileNotFoundError, ValueError) as error:
            fail(str(error), EXIT_INPUT_ERROR)
    if bundled:
        samples = full_photo_samples()
        if count > len(samples):
            per_photo = -(-(count - len(samples)) // len(samples))
            samples = samples + random_crops(per_photo, seed=seed)
        named.extend((f"bundled:{sample.name}", sample.pixels()) for sample in samples[:count])
    if not named:
        fail("no images found", EXIT_INPUT_ERROR)

    _run(
        cls,
        named,
        out,
        params,
        seed=seed,
        quantize=quantize,
        targeted=targeted,
        target_class=target_class,
        device=device,
        batch_size=batch_size,
    )


def _run(
    cls: Any,
    named: list[tuple[str, Any]],
    out: Path,
    params: dict[str, Any],
    *,
    seed: int,
    quantize: bool,
    targeted: bool,
    target_class: Optional[int],
    device: str,
    batch_size: int,
) -> None:
    """Attack ``named`` images in batches and write one set.

    Labels are the model's clean predictions (there is no ground truth here);
    for fooling images they are ``target_class``.
    """
    import torch

    from detector.attacks import AttackResult
    from detector.attacks.io import save_adversarial_set
    from detector.models import imagenet_class_names, load_bundled_model
    from detector.samples import to_tensor

    model = load_bundled_model(device)
    try:
        attacker = cls(model, seed=seed, quantize=quantize, targeted=targeted and not cls.labels_are_targets, **params)
    except (TypeError, ValueError) as error:
        fail(str(error), EXIT_USAGE)
    pixels = to_tensor([array for _, array in named]).to(device)
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(dim=1) for chunk in pixels.split(batch_size)])
    wanted = torch.full_like(predicted, int(target_class)) if target_class is not None else None
    if cls.labels_are_targets:
        labels, wanted = wanted, None
    else:
        labels = predicted
    if hasattr(attacker, "fit"):
        attacker.fit(pixels, labels, wanted if targeted else None)  # universal: one perturbation for the whole set
    results: list[AttackResult] = []
    for start in range(0, len(named), batch_size):
        stop = start + batch_size
        batch_targets = wanted[start:stop] if targeted and wanted is not None else None
        results.append(attacker(pixels[start:stop], labels[start:stop], batch_targets))
    merged = _concat(results)
    manifest = save_adversarial_set(out, [name for name, _ in named], pixels, merged, imagenet_class_names())
    typer.echo(f"{cls.name}: {int(merged.success.sum())}/{len(named)} successful; wrote {manifest}")


def _concat(results: list[Any]) -> Any:
    """Join per-batch results into one ``AttackResult``."""
    import dataclasses

    import torch

    first = results[0]

    def cat(name: str) -> Any:
        values = [getattr(r, name) for r in results]
        return None if values[0] is None else torch.cat(values)

    return dataclasses.replace(
        first,
        adversarial=cat("adversarial"),
        success=cat("success"),
        norms={key: torch.cat([r.norms[key] for r in results]) for key in first.norms},
        labels_before=cat("labels_before"),
        labels_after=cat("labels_after"),
        queries=cat("queries"),
        confidence=cat("confidence"),
        target_labels=cat("target_labels"),
        target_confidence=cat("target_confidence"),
        info={},
    )


def register(app: typer.Typer) -> None:
    app.command("attack")(attack)
