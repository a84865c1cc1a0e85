"""Helpers every attack shares: perturbation norms, 8-bit quantization, RNG isolation.

Kept apart from :mod:`detector.attacks.base` so that tests, the CLI and the
calibration job can measure and quantize images exactly the way attacks do.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

GRID_LEVELS = 255.0
# A pixel counts as changed (for L0) when one of its channels moved by more than
# this; well below half a gray level, well above float32 round-off.
L0_TOLERANCE = 1e-6


def perturbation_norms(adversarial: Tensor, clean: Tensor) -> dict[str, Tensor]:
    """``linf``, ``l2`` and ``l0`` of ``adversarial - clean`` per image, in pixel space [0, 1].

    ``l0`` counts *pixels* (spatial positions with any channel changed), so a
    one-pixel attack has ``l0 == 1`` whatever the number of channels.
    """
    delta = (adversarial - clean).detach().float()
    flat = delta.flatten(1)
    changed = delta.abs().amax(dim=1) > L0_TOLERANCE  # [B, H, W]
    return {
        "linf": flat.abs().amax(dim=1),
        "l2": flat.norm(p=2, dim=1),
        "l0": changed.flatten(1).sum(dim=1).float(),
    }


def is_on_grid(images: Tensor, tolerance: float = 1e-4) -> Tensor:
    """Per image: True when every value is ``k / 255`` for an integer ``k``."""
    scaled = images.detach().float() * GRID_LEVELS
    return ((scaled - scaled.round()).abs() <= tolerance).flatten(1).all(dim=1)


def quantize(adversarial: Tensor, clean: Tensor, norm: str | None = None, eps: float | None = None) -> Tensor:
    """Round ``adversarial`` onto the 8-bit grid, as an uploaded PNG/JPEG would be.

    Plain rounding can push a perturbation past its budget (an L2 step spread
    thinly over 150k values mostly rounds *up*), so for budgeted attacks:

    * ``linf``: round, then clip into the grid points inside ``[clean - eps, clean + eps]``;
    * ``l2``: truncate every value towards the clean one, then round away from
      it the values with the largest remainders while the squared budget allows
      (identical to nearest rounding whenever that already fits).

    Budgets are kept exactly when ``clean`` itself lies on the grid (every real
    8-bit image does); the result is always on the grid.
    """
    adv = adversarial.detach().clamp(0.0, 1.0) * GRID_LEVELS
    if norm == "linf" and eps is not None:
        ref = clean.detach() * GRID_LEVELS
        low = torch.ceil(ref - eps * GRID_LEVELS - 1e-4).clamp(0.0, GRID_LEVELS)
        high = torch.floor(ref + eps * GRID_LEVELS + 1e-4).clamp(0.0, GRID_LEVELS)
        return torch.maximum(torch.minimum(adv.round(), high), low) / GRID_LEVELS
    if norm == "l2" and eps is not None:
        return _quantize_l2(adv, clean.detach() * GRID_LEVELS, eps * GRID_LEVELS) / GRID_LEVELS
    return adv.round() / GRID_LEVELS


def _quantize_l2(adv: Tensor, ref: Tensor, budget: float) -> Tensor:
    """Budget-keeping rounding in gray-level units (see :func:`quantize`)."""
    base = ref.round()
    delta = (adv - base).flatten(1)
    magnitude = delta.abs()
    kept = magnitude.floor()
    remainder = magnitude - kept
    # Cost, in squared gray levels, of moving one more level away from clean.
    extra_cost = 2.0 * kept + 1.0
    spare = budget**2 * (1.0 - 1e-6) - (kept**2).sum(dim=1, keepdim=True)
    wants_up = remainder >= 0.5
    order = torch.argsort(torch.where(wants_up, remainder, torch.full_like(remainder, -1.0)), dim=1, descending=True)
    sorted_cost = torch.gather(torch.where(wants_up, extra_cost, torch.zeros_like(extra_cost)), 1, order)
    affordable_sorted = (sorted_cost.cumsum(dim=1) <= spare) & torch.gather(wants_up, 1, order)
    affordable = torch.zeros_like(wants_up).scatter(1, order, affordable_sorted)
    levels = (kept + affordable.float()) * delta.sign()
    return (base.flatten(1) + levels).clamp(0.0, GRID_LEVELS).view_as(adv)


@contextlib.contextmanager
def isolated_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed the global RNGs libraries draw from, and restore them afterwards.

    torchattacks, ART and scipy use Python's ``random``, numpy's global state and
    torch's default generators instead of taking a generator argument. Seeding
    them here makes an attack reproducible; restoring them keeps the caller's
    own random streams undisturbed.
    """
    cuda_devices: list[int] = []
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        cuda_devices = [index if index is not None else torch.cuda.current_device()]
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda_devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.random.default_generator.manual_seed(seed)
        for index in cuda_devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded ``torch.Generator`` living on ``device`` (for our own attacks' sampling)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
