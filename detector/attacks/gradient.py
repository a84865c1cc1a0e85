"""White-box gradient attacks: FGSM, single L2 gradient step, PGD (Linf, L2), DeepFool, C&W-L2.

FGSM, the L2 gradient step and PGD come from torchattacks (batched, pure
torch, so they run on whatever device the images are on). C&W comes from ART:
torchattacks 3.3.0's C&W has a broken targeted mode and fails on CUDA
(upstream issues #121 and #118, fixed only after 3.3.0). DeepFool is our own
batched port of Foolbox's (see :class:`DeepFool` for why neither library's).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detector.attacks.base import Attack, RawAdversarial
from detector.attacks.common import isolated_rng
from detector.attacks.query import art_pytorch


class _TorchattacksAttack(Attack):
    """Runs one torchattacks attack built by :meth:`_build` on the whole batch."""

    family = "white_box"

    def _build(self) -> Any:
        raise NotImplementedError

    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        attack = self._build()
        attack.set_device(images.device)
        if targets is not None:
            # torchattacks prints the mode change on stdout; keep CLI output clean.
            with contextlib.redirect_stdout(io.StringIO()):
                attack.set_mode_targeted_by_function(lambda _images, wanted: wanted)
        with isolated_rng(self.seed, images.device):
            adversarial = attack(images, targets if targets is not None else labels)
        return RawAdversarial(adversarial)


class FGSM(_TorchattacksAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one signed-gradient step of size ``eps`` (Linf).

    Params: ``eps`` (default 8/255).
    """

    name = "fgsm"
    library = "torchattacks.FGSM"
    norm = "linf"
    defaults = {"eps": 8 / 255}

    def _build(self) -> Any:
        import torchattacks

        return torchattacks.FGSM(self.module, eps=self.params["eps"])


class GradientL2(_TorchattacksAttack):
    """Single L2 gradient step of length ``eps`` (Foolbox L2FastGradientAttack, ART FGM norm=2).

    The paper's "gradient attack". Implemented as torchattacks.PGDL2 with one
    step, step size ``eps`` and no random start, which is exactly that step
    followed by clipping to [0, 1]. Params: ``eps`` (L2, default 1.0).
    """

    name = "gradient_l2"
    library = "torchattacks.PGDL2(steps=1, alpha=eps, random_start=False)"
    norm = "l2"
    defaults = {"eps": 1.0}

    def _build(self) -> Any:
        import torchattacks

        eps = self.params["eps"]
        return torchattacks.PGDL2(self.module, eps=eps, alpha=eps, steps=1, random_start=False)


class PGDLinf(_TorchattacksAttack):
    """Projected Gradient Descent, Linf (Madry et al. 2018).

    Params: ``eps`` (8/255), ``alpha`` step (2/255), ``steps`` (10), ``random_start`` (True).
    """

    name = "pgd_linf"
    library = "torchattacks.PGD"
    norm = "linf"
    defaults = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "random_start": True}

    def _build(self) -> Any:
        import torchattacks

        p = self.params
        return torchattacks.PGD(self.module, eps=p["eps"], alpha=p["alpha"], steps=p["steps"], random_start=p["random_start"])


class PGDL2(_TorchattacksAttack):
    """Projected Gradient Descent, L2.

    Params: ``eps`` (1.0), ``alpha`` step (0.2), ``steps`` (10), ``random_start`` (True).
    """

    name = "pgd_l2"
    library = "torchattacks.PGDL2"
    norm = "l2"
    defaults = {"eps": 1.0, "alpha": 0.2, "steps": 10, "random_start": True}

    def _build(self) -> Any:
        import torchattacks

        p = self.params
        return torchattacks.PGDL2(
            self.module, eps=p["eps"], alpha=p["alpha"], steps=p["steps"], random_start=p["random_start"]
        )


class DeepFool(Attack):
    """DeepFool (Moosavi-Dezfooli et al. 2016): minimal L2 steps to the nearest linearized boundary.

    Own batched torch port of Foolbox 3's ``L2DeepFoolAttack`` (the paper used
    Foolbox): the ``candidates`` classes ranked highest on the clean image are
    the boundaries considered; every step costs one forward and
    ``candidates - 1`` backward passes for the whole batch, and the overshoot
    is applied to the accumulated perturbation at every step.
    Not a library call: torchattacks 3.3.0's DeepFool takes one backward pass
    per class (1000 on ImageNet) per image; ART 1.20's takes gradients for the
    union of all images' top classes (up to B x nb_grads passes per step, so it
    must be fed one image at a time) and was 2-3x slower on EfficientNet-Lite0.
    With ``quantize`` the base class lengthens the perturbation until it
    survives 8-bit rounding: on EfficientNet-Lite0 DeepFool's perturbations
    are ~0.1 gray level, and rounding undid 2 of 4 of ART's.
    Untargeted only. Params: ``steps`` (50), ``overshoot`` (0.02),
    ``candidates`` (10).
    """

    name = "deepfool"
    family = "white_box"
    library = "own (batched torch port of Foolbox L2DeepFoolAttack)"
    supports_targeted = False
    defaults = {"steps": 50, "overshoot": 0.02, "candidates": 10}

    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        assert self.module is not None
        model, p = self.module, self.params
        with torch.no_grad():
            logits = model(images)
        k = min(int(p["candidates"]), logits.shape[1])
        # Other candidate classes: the top-k of the clean logits without the label.
        ranked = logits.scatter(1, labels[:, None], float("-inf")).argsort(dim=1, descending=True)[:, : k - 1]
        total = torch.zeros_like(images)
        adversarial = images.clone()
        rows = torch.arange(images.shape[0], device=images.device)
        for _ in range(int(p["steps"])):
            x = adversarial.clone().requires_grad_(True)
            out = model(x)
            active = out.argmax(dim=1) == labels
            if not bool(active.any()):
                break
            losses, grads = [], []
            for j in range(k - 1):
                loss = out[rows, ranked[:, j]] - out[rows, labels]
                grads.append(torch.autograd.grad(loss.sum(), x, retain_graph=j < k - 2)[0])
                losses.append(loss.detach())
            loss_k = torch.stack(losses, dim=1)  # [B, k-1], negative while not fooled
            grad_k = torch.stack(grads, dim=1)  # [B, k-1, C, H, W]
            norms = grad_k.flatten(2).norm(dim=2) + 1e-8
            best = (loss_k.abs() / norms).argmin(dim=1)
            step = (loss_k[rows, best].abs() + 1e-4) / norms[rows, best] ** 2
            update = step.view(-1, 1, 1, 1) * grad_k[rows, best]
            total = torch.where(active.view(-1, 1, 1, 1), total + update, total)
            adversarial = (images + (1.0 + float(p["overshoot"])) * total).clamp(0.0, 1.0).detach()
        return RawAdversarial(adversarial)


class CarliniWagnerL2(Attack):
    """Carlini & Wagner L2 (2017) with a binary search over the trade-off constant.

    Batched in ART (``batch_size``). Params: ``confidence`` (kappa, 0),
    ``learning_rate`` (0.01), ``binary_search_steps`` (5), ``max_iter`` (10),
    ``initial_const`` (1.0; with ART's 0.01 five search steps did not reach a working constant), ``batch_size`` (16).
    """

    name = "cw_l2"
    family = "white_box"
    library = "art.attacks.evasion.CarliniL2Method"
    defaults = {
        "confidence": 0.0,
        "learning_rate": 0.01,
        "binary_search_steps": 5,
        "max_iter": 10,
        "initial_const": 1.0,
        "batch_size": 16,
    }

    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        from art.attacks.evasion import CarliniL2Method

        nb_classes = int(self.query_model.predict(images[:1], count=False).shape[1])
        classifier = art_pytorch(self.module, tuple(images.shape[1:]), nb_classes, images.device)
        p = self.params
        attack = CarliniL2Method(
            classifier,
            confidence=float(p["confidence"]),
            targeted=targets is not None,
            learning_rate=float(p["learning_rate"]),
            binary_search_steps=int(p["binary_search_steps"]),
            max_iter=int(p["max_iter"]),
            initial_const=float(p["initial_const"]),
            batch_size=int(p["batch_size"]),
            verbose=False,
        )
        wanted = (targets if targets is not None else labels).cpu().numpy()
        with isolated_rng(self.seed, images.device):
            adversarial = attack.generate(images.detach().cpu().numpy().astype(np.float32), y=wanted)
        return RawAdversarial(torch.from_numpy(adversarial))
