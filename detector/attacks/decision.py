"""Decision-based black-box attacks (only the predicted label is used): Boundary, HopSkipJump.

Both come from ART and reach the model only through the attack's
:class:`~detector.attacks.query.QueryModel`. ART runs them one image at a
time, so we call it per image and read that image's query count off the
counter. Their starting points are ours: ART draws them from an unseeded
``np.random.RandomState()``, which would make runs irreproducible, and starts
the Boundary attack from pure noise. We draw seeded uniform noise (or, for a
targeted attack, another image of the batch already in the target class) and
blend it towards the clean image as far as it stays adversarial, as Foolbox's
``LinearSearchBlendedUniformNoiseAttack`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from detector.attacks.base import Attack, RawAdversarial
from detector.attacks.common import isolated_rng, make_generator
from detector.attacks.query import QueryModel, art_blackbox


def _hits(predictions: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    return predictions == targets if targets is not None else predictions != labels


def starting_points(
    query: QueryModel,
    images: Tensor,
    labels: Tensor,
    targets: Tensor | None,
    *,
    seed: int,
    tries: int = 100,
    blend_steps: int = 25,
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded adversarial starting points close to ``images``.

    Returns (points, found [B] bool, queries [B]). Batched over images: each
    round draws one noise image per still-unsolved image.
    """
    batch = images.shape[0]
    generator = make_generator(seed, images.device)
    points = images.clone()
    found = torch.zeros(batch, dtype=torch.bool, device=images.device)
    queries = torch.zeros(batch, device=images.device)
    if targets is not None:
        # Another image of the batch already classified as the target is the best start.
        predicted = query.predict(images, count=False).argmax(dim=1)
        match = predicted[None, :] == targets[:, None]
        has = match.any(dim=1)
        points[has] = images[match.float().argmax(dim=1)[has]]
        found |= has
    for _ in range(tries):
        todo = (~found).nonzero().flatten()
        if todo.numel() == 0:
            break
        noise = torch.rand(images[todo].shape, generator=generator, device=images.device)
        hit = _hits(query(noise).argmax(dim=1), labels[todo], None if targets is None else targets[todo])
        queries[todo] += 1
        points[todo[hit]] = noise[hit]
        found[todo[hit]] = True
    # Blend: x + t (start - x) for the smallest t on the grid still adversarial.
    ts = torch.linspace(0.0, 1.0, blend_steps + 1, device=images.device)[1:]
    index = found.nonzero().flatten()
    if index.numel():
        clean, start = images[index], points[index]
        blends = clean[None] + ts.view(-1, 1, 1, 1, 1) * (start - clean)[None]
        predictions = query(blends.flatten(0, 1)).argmax(dim=1).view(len(ts), -1)
        queries[index] += len(ts)
        ok = _hits(predictions, labels[index][None], None if targets is None else targets[index][None])
        ok[-1] = True  # t = 1 is the start itself
        first = ok.float().argmax(dim=0)
        points[index] = blends[first, torch.arange(index.numel(), device=images.device)]
    return points, found, queries


class _ArtDecisionAttack(Attack):
    """Shared per-image driver for ART's decision-based attacks."""

    family = "black_box_probing"
    needs_gradients = False

    def _art_attack(self, estimator: Any, targeted: bool) -> Any:
        raise NotImplementedError

    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        query = self.query_model
        clean_logits = query.predict(images, count=False)
        nb_classes = int(clean_logits.shape[1])
        # Already adversarial (e.g. a misclassified clean image): nothing to do,
        # and ART would disagree with us on which class to leave.
        done = _hits(clean_logits.argmax(dim=1), labels, targets)
        estimator = art_blackbox(query, tuple(images.shape[1:]), nb_classes, images.device)
        attack = self._art_attack(estimator, targeted=targets is not None)
        init, found, queries = starting_points(
            query, images, labels, targets, seed=self.seed, tries=int(self.params["init_size"])
        )
        clean = images.detach().cpu().numpy().astype(np.float32)
        start = init.detach().cpu().numpy().astype(np.float32)
        wanted = (targets if targets is not None else labels).cpu().numpy()
        adversarial = clean.copy()
        with isolated_rng(self.seed, images.device):
            for i in range(len(clean)):
                if bool(done[i]) or not bool(found[i]):
                    continue  # already adversarial, or no adversarial start to walk from
                before = query.queries
                y = wanted[i : i + 1] if targets is not None else None
                adversarial[i] = attack.generate(clean[i : i + 1], y=y, x_adv_init=start[i : i + 1])[0]
                queries[i] += query.queries - before
        return RawAdversarial(torch.from_numpy(adversarial), queries=queries, info={"start_found": found})


class Boundary(_ArtDecisionAttack):
    """Boundary attack (Brendel et al. 2018): random walk along the decision boundary towards the clean image.

    Params: ``max_iter`` (1000; ART's 5000 took over an hour per Lite0 image on our CPU),
    ``delta`` (0.01 orthogonal step), ``epsilon`` (0.01 step towards the
    image), ``step_adapt`` (0.667), ``num_trial`` (25), ``sample_size`` (20),
    ``init_size`` (100 noise draws for the start), ``batch_size`` (64).
    """

    name = "boundary"
    library = "art.attacks.evasion.BoundaryAttack"
    defaults = {
        "max_iter": 1000,
        "delta": 0.01,
        "epsilon": 0.01,
        "step_adapt": 0.667,
        "num_trial": 25,
        "sample_size": 20,
        "init_size": 100,
        "batch_size": 64,
    }

    def _art_attack(self, estimator: Any, targeted: bool) -> Any:
        from art.attacks.evasion import BoundaryAttack

        p = self.params
        return BoundaryAttack(
            estimator,
            batch_size=int(p["batch_size"]),
            targeted=targeted,
            delta=float(p["delta"]),
            epsilon=float(p["epsilon"]),
            step_adapt=float(p["step_adapt"]),
            max_iter=int(p["max_iter"]),
            num_trial=int(p["num_trial"]),
            sample_size=int(p["sample_size"]),
            init_size=int(p["init_size"]),
            verbose=False,
        )


class HopSkipJump(_ArtDecisionAttack):
    """HopSkipJumpAttack (Chen et al. 2020): boundary search with estimated gradient directions.

    Params: ``norm`` (2 or "inf"; 2), ``max_iter`` (20), ``max_eval`` (1000
    queries per gradient estimate), ``init_eval`` (100), ``init_size`` (100),
    ``batch_size`` (64).
    """

    name = "hopskipjump"
    library = "art.attacks.evasion.HopSkipJump"
    defaults = {"norm": 2, "max_iter": 20, "max_eval": 1000, "init_eval": 100, "init_size": 100, "batch_size": 64}

    def _art_attack(self, estimator: Any, targeted: bool) -> Any:
        from art.attacks.evasion import HopSkipJump as ArtHopSkipJump

        p = self.params
        norm = np.inf if str(p["norm"]).lower() in ("inf", "linf") else 2
        return ArtHopSkipJump(
            estimator,
            batch_size=int(p["batch_size"]),
            targeted=targeted,
            norm=norm,
            max_iter=int(p["max_iter"]),
            max_eval=int(p["max_eval"]),
            init_eval=int(p["init_eval"]),
            init_size=int(p["init_size"]),
            verbose=False,
        )
