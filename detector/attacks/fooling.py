"""Fooling images (Nguyen, Yosinski, Clune 2015): evolve an image the model puts in a chosen class.

Our own code: neither torchattacks nor ART has fooling images. Two genome
encodings from the paper:

* ``fooling_direct``: the genome is the pixels; each value mutates with a rate
  starting at 0.1 and halving every 1000 generations, by the polynomial
  mutation operator (strength 15), from uniform-noise initial images.
* ``fooling_cppn``: the genome is a compositional pattern-producing network
  mapping (x, y, distance to centre, bias) to RGB, whose hidden nodes use sine,
  sigmoid, Gaussian or linear activations. NEAT's topology growth is replaced
  by a fixed stack of layers whose connections mutate on/off and whose node
  activations mutate, so the batch of networks renders as tensor ops.

Both run a (mu + lambda) evolution for every wanted class at once (each parent
begets one mutated child; the best ``population`` of parents and children
survive) and stop per image once the wanted class's softmax probability
reaches ``confidence``. Only predictions are used, so the model can be a
:class:`~detector.attacks.query.QueryModel`. The images passed in only give
shape and device; ``labels`` are the wanted classes. ``target_confidence`` in
the result is the probability reached, measured on the returned image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detector.attacks.base import Attack, AttackResult, RawAdversarial
from detector.attacks.common import GRID_LEVELS, make_generator

Genomes = dict[str, Tensor]  # every tensor shaped [B, P, ...]


def _take(genomes: Genomes, index: Tensor) -> Genomes:
    return {key: value[index] for key, value in genomes.items()}


def _put(genomes: Genomes, index: Tensor, values: Genomes) -> None:
    for key in genomes:
        genomes[key][index] = values[key]


def _select(genomes: Genomes, order: Tensor) -> Genomes:
    """Per image, keep individuals ``order`` [B, K] along the population axis."""
    out = {}
    for key, value in genomes.items():
        index = order.view(*order.shape, *([1] * (value.ndim - 2))).expand(-1, -1, *value.shape[2:])
        out[key] = torch.gather(value, 1, index)
    return out


class _Fooling(Attack):
    """Evolution loop shared by both encodings; subclasses define init, mutation and rendering."""

    family = "fooling"
    needs_gradients = False
    labels_are_targets = True
    norm = None
    common_defaults = {"population": 16, "max_generations": 500, "confidence": 0.99}

    def _initial(self, count: int, shape: torch.Size, generator: torch.Generator, device: torch.device) -> Genomes:
        raise NotImplementedError

    def _mutate(self, genomes: Genomes, generation: int, generator: torch.Generator) -> Genomes:
        raise NotImplementedError

    def _render_flat(self, genomes: Genomes, shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def render(self, genomes: Genomes, shape: torch.Size) -> Tensor:
        """[B, P] genomes -> [B, P, C, H, W] images, on the 8-bit grid when quantizing."""
        batch, population = next(iter(genomes.values())).shape[:2]
        flat = {key: value.flatten(0, 1) for key, value in genomes.items()}
        images = self._render_flat(flat, shape).clamp(0.0, 1.0)
        if self.quantize:
            images = (images * GRID_LEVELS).round() / GRID_LEVELS
        return images.view(batch, population, *shape)

    def _fitness(self, genomes: Genomes, targets: Tensor, shape: torch.Size) -> Tensor:
        images = self.render(genomes, shape)
        batch, population = images.shape[:2]
        probabilities = self.query_model(images.flatten(0, 1)).softmax(dim=1)
        wanted = targets.repeat_interleave(population)
        return probabilities[torch.arange(wanted.numel(), device=wanted.device), wanted].view(batch, population)

    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        assert targets is not None
        device, shape = images.device, images.shape[1:]
        batch, population = images.shape[0], int(self.params["population"])
        generator = make_generator(self.seed, device)
        genomes = self._initial(batch * population, shape, generator, device)
        genomes = {key: value.view(batch, population, *value.shape[1:]) for key, value in genomes.items()}
        fitness = self._fitness(genomes, targets, shape)
        queries = torch.full((batch,), float(population), device=device)
        generations = torch.zeros(batch, device=device)
        goal = float(self.params["confidence"])
        for generation in range(int(self.params["max_generations"])):
            active = (fitness.amax(dim=1) < goal).nonzero().flatten()
            if active.numel() == 0:
                break
            parents = _take(genomes, active)
            children = self._mutate(parents, generation, generator)
            child_fitness = self._fitness(children, targets[active], shape)
            queries[active] += population
            generations[active] += 1
            merged = {key: torch.cat([parents[key], children[key]], dim=1) for key in genomes}
            merged_fitness = torch.cat([fitness[active], child_fitness], dim=1)
            order = torch.sort(merged_fitness, dim=1, descending=True, stable=True).indices[:, :population]
            _put(genomes, active, _select(merged, order))
            fitness[active] = torch.gather(merged_fitness, 1, order)
        best = _select(genomes, fitness.argmax(dim=1, keepdim=True))
        adversarial = self.render(best, shape)[:, 0]
        return RawAdversarial(adversarial, queries=queries, info={"generations": generations, "goal": goal})

    def __call__(self, images: Tensor, labels: Tensor, target_labels: Tensor | None = None) -> AttackResult:
        """Evolve one fooling image per entry of ``labels`` (the wanted classes).

        ``info["reached"]`` marks images whose wanted class got at least
        ``confidence`` on the returned (final) image.
        """
        result = super().__call__(images, labels, target_labels)
        assert result.target_confidence is not None
        result.info["reached"] = result.target_confidence >= float(self.params["confidence"])
        return result


class FoolingDirect(_Fooling):
    """Fooling images with the direct (pixel) encoding.

    Params: ``population`` (16), ``max_generations`` (500), ``confidence``
    (0.99, the paper's threshold), ``mutation_rate`` (0.1), ``rate_halflife``
    (1000 generations), ``eta`` (15, polynomial-mutation strength).
    """

    name = "fooling_direct"
    library = "own (no library has fooling images)"
    defaults = {**_Fooling.common_defaults, "mutation_rate": 0.1, "rate_halflife": 1000, "eta": 15.0}

    def _initial(self, count, shape, generator, device) -> Genomes:
        return {"pixels": torch.rand((count, *shape), generator=generator, device=device)}

    def _mutate(self, genomes: Genomes, generation: int, generator: torch.Generator) -> Genomes:
        pixels = genomes["pixels"]
        rate = float(self.params["mutation_rate"]) * 0.5 ** (generation // int(self.params["rate_halflife"]))
        chosen = torch.rand(pixels.shape, generator=generator, device=pixels.device) < rate
        # Polynomial mutation (Deb), drawn only for the chosen values.
        u = torch.rand(int(chosen.sum()), generator=generator, device=pixels.device)
        power = 1.0 / (float(self.params["eta"]) + 1.0)
        step = torch.where(u < 0.5, (2.0 * u) ** power - 1.0, 1.0 - (2.0 * (1.0 - u)) ** power)
        children = pixels.clone()
        children[chosen] = (children[chosen] + step).clamp(0.0, 1.0)
        return {"pixels": children}

    def _render_flat(self, genomes: Genomes, shape: torch.Size) -> Tensor:
        return genomes["pixels"]


ACTIVATIONS = ("sine", "sigmoid", "gaussian", "linear")
CPPN_INPUTS = ("x", "y", "d", "bias")  # d: distance to the image centre


class FoolingCPPN(_Fooling):
    """Fooling images with the CPPN encoding (inputs x, y, d, bias; sine/sigmoid/Gaussian/linear nodes).

    Params: ``population`` (16), ``max_generations`` (500), ``confidence``
    (0.99), ``hidden`` (layer widths, (8, 8, 8)), ``init_std`` (1.0),
    ``weight_rate`` (0.2 of weights mutate per child), ``weight_sigma`` (0.5),
    ``activation_rate`` (0.05), ``connection_rate`` (0.02, toggle on/off).
    """

    name = "fooling_cppn"
    library = "own (no library has fooling images)"
    defaults = {
        **_Fooling.common_defaults,
        "hidden": (8, 8, 8),
        "init_std": 1.0,
        "weight_rate": 0.2,
        "weight_sigma": 0.5,
        "activation_rate": 0.05,
        "connection_rate": 0.02,
    }

    def _layer_shapes(self, channels: int) -> list[tuple[int, int]]:
        widths = [3, *[int(width) for width in self.params["hidden"]], channels]
        return [(fan_in + 1, fan_out) for fan_in, fan_out in zip(widths[:-1], widths[1:])]  # +1: bias input

    def _initial(self, count, shape, generator, device) -> Genomes:
        layers = self._layer_shapes(shape[0])
        n_weights = sum(a * b for a, b in layers)
        n_hidden = sum(int(width) for width in self.params["hidden"])
        return {
            "weights": torch.randn((count, n_weights), generator=generator, device=device) * float(self.params["init_std"]),
            "enabled": torch.ones((count, n_weights), dtype=torch.bool, device=device),
            "activations": torch.randint(0, len(ACTIVATIONS), (count, n_hidden), generator=generator, device=device),
        }

    def _mutate(self, genomes: Genomes, generation: int, generator: torch.Generator) -> Genomes:
        p = self.params
        weights, enabled, activations = genomes["weights"], genomes["enabled"], genomes["activations"]
        device = weights.device

        def coin(like: Tensor, rate: float) -> Tensor:
            return torch.rand(like.shape, generator=generator, device=device) < rate

        noise = torch.randn(weights.shape, generator=generator, device=device) * float(p["weight_sigma"])
        new_weights = weights + coin(weights, float(p["weight_rate"])) * noise
        new_enabled = enabled ^ coin(enabled, float(p["connection_rate"]))
        redraw = torch.randint(0, len(ACTIVATIONS), activations.shape, generator=generator, device=device)
        new_activations = torch.where(coin(activations, float(p["activation_rate"])), redraw, activations)
        return {"weights": new_weights, "enabled": new_enabled, "activations": new_activations}

    def _render_flat(self, genomes: Genomes, shape: torch.Size) -> Tensor:
        channels, height, width = shape
        weights = genomes["weights"] * genomes["enabled"]
        device = weights.device
        ys, xs = torch.meshgrid(
            torch.linspace(-1.0, 1.0, height, device=device), torch.linspace(-1.0, 1.0, width, device=device), indexing="ij"
        )
        coords = torch.stack([xs, ys, torch.sqrt(xs**2 + ys**2)], dim=-1).view(1, height * width, 3)
        layers = self._layer_shapes(channels)
        widest = max(fan_out for _, fan_out in layers)
        # Render a few networks at a time: every hidden layer is [n, H*W, width].
        chunk = max(1, (1 << 23) // (height * width * widest))
        images = []
        for start in range(0, weights.shape[0], chunk):
            w = weights[start : start + chunk]
            acts = genomes["activations"][start : start + chunk]
            images.append(self._forward(coords.expand(w.shape[0], -1, -1), w, acts, layers))
        return torch.cat(images).transpose(1, 2).reshape(-1, channels, height, width)

    @staticmethod
    def _forward(h: Tensor, weights: Tensor, activations: Tensor, layers: list[tuple[int, int]]) -> Tensor:
        offset, node = 0, 0
        for index, (fan_in, fan_out) in enumerate(layers):
            w = weights[:, offset : offset + fan_in * fan_out].view(-1, fan_in, fan_out)
            offset += fan_in * fan_out
            z = torch.bmm(torch.cat([h, torch.ones_like(h[..., :1])], dim=-1), w)
            if index == len(layers) - 1:
                return torch.sigmoid(z)
            kind = activations[:, None, node : node + fan_out]
            node += fan_out
            h = torch.where(
                kind == 0,
                torch.sin(z),
                torch.where(kind == 1, torch.sigmoid(z), torch.where(kind == 2, torch.exp(-(z**2)), z)),
            )
        raise AssertionError("unreachable")

