"""Score-based black-box attacks (they read the model's output scores): Square, one-pixel.

Both reach the model only through the attack's
:class:`~detector.attacks.query.QueryModel`.

* Square (Andriushchenko et al. 2020) is torchattacks' implementation, batched
  over images; we call its ``attack_single_run`` directly because that is what
  returns the per-image query counts (``forward`` drops them).
* One-pixel (Su et al. 2019) is differential evolution from scipy. torchattacks'
  ``OnePixel`` and ART's ``PixelAttack`` both wrap an unseedable copy of an old
  scipy DE, stop only on misclassification and paint candidates in Python
  loops. scipy's ``differential_evolution`` takes a seed, evaluates a whole
  population in one batched model query (``vectorized=True``) and lets us use
  Su et al.'s ImageNet stopping rule: stop once the true class's probability is
  below 5% (untargeted) or the target's is above 50% (targeted). DE optimizes
  one image at a time, so images are looped over.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detector.attacks.base import Attack, RawAdversarial
from detector.attacks.common import isolated_rng
from detector.attacks.query import PredictFn, QueryModel, QueryModule


class Square(Attack):
    """Square attack: random square-shaped updates accepted when the margin loss improves.

    Params: ``eps`` (8/255), ``norm`` ("linf" or "l2"; "linf"), ``n_queries``
    (1000 per image), ``p_init`` (0.8), ``loss`` ("margin" or "ce").
    """

    name = "square"
    family = "black_box_probing"
    library = "torchattacks.Square"
    needs_gradients = False
    norm = "linf"
    defaults = {"eps": 8 / 255, "norm": "linf", "n_queries": 1000, "p_init": 0.8, "loss": "margin"}

    def __init__(self, model: nn.Module | QueryModel | PredictFn, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        norm = str(self.params["norm"]).lower()
        if norm not in ("linf", "l2"):
            raise ValueError(f"square: norm must be 'linf' or 'l2', got {norm!r}")
        self.norm = norm

    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        import torchattacks

        p = self.params
        attack = torchattacks.Square(
            QueryModule(self.query_model, images.device),
            norm="Linf" if self.norm == "linf" else "L2",
            eps=float(p["eps"]),
            n_queries=int(p["n_queries"]),
            p_init=float(p["p_init"]),
            loss=str(p["loss"]),
            seed=self.seed,
        )
        attack.set_device(images.device)
        if targets is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                attack.set_mode_targeted_by_function(lambda _images, wanted: wanted)
        attack.init_hyperparam(images)
        with isolated_rng(self.seed, images.device):
            queries, adversarial = attack.attack_single_run(images.detach(), targets if targets is not None else labels)
        return RawAdversarial(adversarial, queries=queries.float())


class OnePixel(Attack):
    """One-pixel attack (Su et al. 2019): differential evolution over (x, y, r, g, b) of ``pixels`` pixels.

    Params (Su et al.'s ImageNet setup): ``pixels`` (1), ``popsize`` (400
    candidates per generation), ``max_iter`` (100 generations), ``mutation``
    (0.5), ``recombination`` (1.0), ``stop_probability`` (0.05: untargeted
    stop once the true class's probability is below it), ``target_probability``
    (0.5: targeted stop once the target's probability is above it).
    With ``quantize=True`` the colours are searched on the 8-bit grid directly.
    """

    name = "one_pixel"
    family = "black_box_probing"
    library = "scipy.optimize.differential_evolution (own objective)"
    needs_gradients = False
    norm = "l0"
    defaults = {
        "pixels": 1,
        "popsize": 400,
        "max_iter": 100,
        "mutation": 0.5,
        "recombination": 1.0,
        "stop_probability": 0.05,
        "target_probability": 0.5,
    }

    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        adversarial = images.clone()
        queries = torch.zeros(images.shape[0], device=images.device)
        with isolated_rng(self.seed, images.device):
            for i in range(images.shape[0]):
                before = self.query_model.queries
                wanted = int((targets if targets is not None else labels)[i])
                adversarial[i] = self._attack_one(images[i], wanted, targeted=targets is not None, seed=self.seed + i)
                queries[i] = self.query_model.queries - before
        return RawAdversarial(adversarial, queries=queries)

    def _attack_one(self, image: Tensor, wanted: int, *, targeted: bool, seed: int) -> Tensor:
        from scipy.optimize import differential_evolution

        p = self.params
        channels, height, width = image.shape
        pixels = int(p["pixels"])
        top = 255.0 if self.quantize else 1.0
        bounds = ([(0, height - 1), (0, width - 1)] + [(0.0, top)] * channels) * pixels
        integrality = ([True, True] + [self.quantize] * channels) * pixels
        per_pixel = 2 + channels

        def paint(candidates: np.ndarray) -> Tensor:
            """[S, pixels*(2+C)] candidates -> [S, C, H, W] images (vectorized)."""
            genes = torch.as_tensor(candidates, dtype=torch.float32, device=image.device).view(-1, pixels, per_pixel)
            count = genes.shape[0]
            painted = image.expand(count, -1, -1, -1).clone()
            rows = genes[..., 0].round().long().clamp(0, height - 1)
            cols = genes[..., 1].round().long().clamp(0, width - 1)
            colours = (genes[..., 2:] / top).clamp(0.0, 1.0)  # [S, pixels, C]
            which = torch.arange(count, device=image.device)[:, None].expand(-1, pixels)
            painted[which, :, rows, cols] = colours
            return painted

        def energy(population: np.ndarray) -> np.ndarray:
            # scipy passes [N, S] when vectorized
            probabilities = self.query_model(paint(population.T)).softmax(dim=1)[:, wanted]
            return (1.0 - probabilities if targeted else probabilities).cpu().double().numpy()

        goal = 1.0 - float(p["target_probability"]) if targeted else float(p["stop_probability"])
        dimensions = len(bounds)
        result = differential_evolution(
            energy,
            bounds,
            maxiter=int(p["max_iter"]),
            popsize=max(1, int(p["popsize"]) // dimensions),
            mutation=float(p["mutation"]),
            recombination=float(p["recombination"]),
            rng=np.random.default_rng(seed),
            callback=lambda intermediate_result: bool(intermediate_result.fun < goal),
            init="random",
            polish=False,
            atol=-1,
            tol=0,
            vectorized=True,
            updating="deferred",
            integrality=integrality,
        )
        return paint(result.x[None, :])[0]
