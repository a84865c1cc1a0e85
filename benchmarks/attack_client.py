"""A black-box attack run as one remote client of a KServe-v2 endpoint, with every call recorded.

Why this exists: probing detection (issue 12) and the black-box part of the
corpus study need attacks that reach the model *only* the way a real client
does, through the gRPC endpoint (Triton, or the advsentry sidecar in front of
it), under one client identity, and a log of what the server answered to each
call. From that log follow the two numbers a defence against probing is judged
by: **queries until detection** (the first call that was refused or carried a
truthy ``advsentry_probing`` parameter) and **queries until success** (the first
call whose answer showed the model fooled by an image within the attack's
budget).

Use::

    from benchmarks.attack_client import AttackClient

    with AttackClient("127.0.0.1:8001", "efficientnet-lite0", client_id="attacker-1") as client:
        run = client.run("square", images, params={"eps": 8 / 255, "n_queries": 300})
    run.queries_until_detection(), run.queries_until_success(), run.to_dict()

or ``python -m benchmarks.attack_client --url HOST:PORT --model NAME --attack square
--param eps=0.0314 --param n_queries=300 --client-id attacker-1 --out run.json IMAGE...``.

The attacks are the project's own (``detector.attacks``: ``square``,
``hopskipjump``, ``boundary``, ``one_pixel``), given prediction-only access
through :class:`detector.calibrate.triton_query.TritonEndpoint`. Inputs are
attacked one after another (one client, one image at a time, as a person
probing a service would). Queries are counted in images: one RPC of 8 images
is 8 queries. Every RPC the client makes is recorded, including the
bookkeeping predictions the attack framework does not count (clean labels,
final checks): the server sees those too.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.attacks import QueryModel, make_attack
from detector.attacks.common import perturbation_norms
from detector.calibrate.triton_query import CallRecord, TlsConfig, TritonCallError, TritonEndpoint

LOGGER = logging.getLogger("attack_client")

#: Black-box attacks a client can run (prediction-only access).
CLIENT_ATTACKS: tuple[str, ...] = ("square", "hopskipjump", "boundary", "one_pixel")
#: The response parameter the sidecar's probing detection sets (issue 12).
DETECTION_PARAMETER = "advsentry_probing"
DEFAULT_CLIENT_ID_KEY = "x-client-id"


def truthy(value: Any) -> bool:
    """A response parameter read as a flag: True, a non-zero number, or a string other than ''/0/false/none/no."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "none", "no", "off")
    return bool(value)


@dataclass(frozen=True)
class QueryRecord:
    """One ModelInfer RPC of the client.

    ``image``: index of the input under attack (``-1``: none); ``sent_before``:
    images this run had sent before this RPC; ``fooled``: images of this RPC the
    server classified away from the input's label; ``fooled_in_budget``: of
    those, images within the success budget (see :meth:`AttackClient.run`).
    """

    call: int
    image: int
    images: int
    sent_before: int
    status: str
    message: str
    parameters: dict[str, bool | int | float | str]
    fooled: int
    fooled_in_budget: int
    seconds: float
    detection_parameter: str = DETECTION_PARAMETER

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def detected(self) -> bool:
        """Refused (any non-OK status) or flagged as probing in the response parameters."""
        return not self.ok or truthy(self.parameters.get(self.detection_parameter, False))


@dataclass
class InputOutcome:
    """What the attack achieved on one input (final image 8-bit quantized unless ``quantize=False``)."""

    image: int
    label: int
    attempted: bool
    success: bool = False
    label_after: int | None = None
    queries: float | None = None  # the attack's own count (Square: until success; decision attacks: all)
    sent: int = 0  # images this input cost the client, bookkeeping included
    linf: float | None = None
    l2: float | None = None
    stopped: str | None = None  # why the attack ended early (a refused call)
    adversarial: np.ndarray | None = field(default=None, repr=False)  # uint8 [3, H, W] when quantized, else float

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "adversarial"}


@dataclass
class ClientRun:
    """One attack run by one client: settings, every RPC, per-input outcomes."""

    attack: str
    params: dict[str, Any]
    client_id: str | None
    endpoint: str
    seed: int
    success_budget: dict[str, float] | None
    records: list[QueryRecord] = field(default_factory=list)
    outcomes: list[InputOutcome] = field(default_factory=list)

    @property
    def images_sent(self) -> int:
        return sum(r.images for r in self.records)

    def _first(self, predicate, image: int | None) -> int | None:
        for record in self.records:
            if (image is None or record.image == image) and predicate(record):
                return record.sent_before + record.images - (0 if image is None else self._sent_before_image(image))
        return None

    def _sent_before_image(self, image: int) -> int:
        first = next((r for r in self.records if r.image == image), None)
        return first.sent_before if first else 0

    def queries_until_detection(self, image: int | None = None) -> int | None:
        """Images sent up to and including the first refused or probing-flagged call (None: never detected).

        Counted from the run's start, or from the first call for ``image``.
        """
        return self._first(lambda r: r.detected, image)

    def queries_until_success(self, image: int | None = None) -> int | None:
        """Images sent up to and including the first answer that showed a fooled image within budget."""
        return self._first(lambda r: r.ok and r.fooled_in_budget > 0, image)

    def summary(self) -> dict[str, Any]:
        attempted = [o for o in self.outcomes if o.attempted]
        return {
            "inputs": len(self.outcomes),
            "attempted": len(attempted),
            "successes": sum(o.success for o in attempted),
            "images_sent": self.images_sent,
            "calls": len(self.records),
            "refused_calls": sum(not r.ok for r in self.records),
            "flagged_calls": sum(r.ok and r.detected for r in self.records),
            "queries_until_detection": self.queries_until_detection(),
            "queries_until_success": self.queries_until_success(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack, "params": self.params, "client_id": self.client_id, "endpoint": self.endpoint,
            "seed": self.seed, "success_budget": self.success_budget, "summary": self.summary(),
            "outcomes": [o.to_dict() | {"queries_until_success": self.queries_until_success(o.image),
                                        "queries_until_detection": self.queries_until_detection(o.image)}
                         for o in self.outcomes],
            "records": [asdict(r) for r in self.records],
        }


class _Refused(Exception):
    """Raised inside the attack's predict call to abort the attack after a refused RPC."""

    def __init__(self, record: CallRecord) -> None:
        super().__init__(record.status)
        self.record = record


class AttackClient:
    """One simulated client of a KServe-v2 endpoint (Triton or the sidecar).

    ``client_id`` is sent as gRPC metadata under ``client_id_key`` with every
    call (how the sidecar tells clients apart when ``client_id_metadata_key`` is
    set); ``headers`` adds more metadata; ``tls`` connects over (m)TLS.
    ``stop_on_refusal``: a refused call ends the whole run (a blocked client);
    otherwise only the current input's attack ends and the next input starts.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        client_id: str | None = None,
        client_id_key: str = DEFAULT_CLIENT_ID_KEY,
        headers: Mapping[str, str] | None = None,
        tls: TlsConfig | None = None,
        stop_on_refusal: bool = True,
        detection_parameter: str = DETECTION_PARAMETER,
        timeout_s: float = 120.0,
    ) -> None:
        metadata = dict(headers or {})
        if client_id is not None:
            metadata[client_id_key] = client_id
        self.client_id = client_id
        self.stop_on_refusal = stop_on_refusal
        self.detection_parameter = detection_parameter
        self._last: list[CallRecord] = []
        self.endpoint = TritonEndpoint(url, model, headers=metadata, tls=tls, timeout_s=timeout_s,
                                       on_call=self._last.append)

    def __enter__(self) -> AttackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.endpoint.close()

    def run(
        self,
        attack: str,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
        quantize: bool = True,
        success_budget: Mapping[str, float] | None = None,
    ) -> ClientRun:
        """Attack each of ``images`` (``[N, 3, H, W]`` in ``[0, 1]``) in turn, untargeted, through the endpoint.

        ``labels``: the classes to move away from (default: the endpoint's own
        prediction of each clean image, one query each). ``seed``: input ``i``
        is attacked with seed ``seed + i``. ``success_budget``
        (``{"linf": ..., "l2": ...}``, pixel units): an answer counts towards
        "queries until success" only for images within it; default the
        attack's own ``eps`` for budgeted attacks (Square), none otherwise.
        """
        if attack not in CLIENT_ATTACKS:
            raise ValueError(f"unknown client attack {attack!r}; known: {', '.join(CLIENT_ATTACKS)}")
        params = dict(params or {})
        images = images.detach().float().cpu().contiguous()
        probe = make_attack(attack, QueryModel(lambda x: x), seed=seed, quantize=quantize, **params)
        if success_budget is None and probe.budget is not None and probe.norm in ("linf", "l2"):
            success_budget = {probe.norm: float(probe.budget)}
        budget = dict(success_budget) if success_budget else None
        run = ClientRun(attack, probe.describe()["params"], self.client_id, self.endpoint.describe(), seed, budget)
        state: dict[str, Any] = {"image": -1, "clean": None, "label": None}

        def note(pixels: torch.Tensor | None, logits: torch.Tensor | None) -> None:
            sent_before = run.images_sent
            for record in self._last:
                fooled = in_budget = 0
                if record.ok and logits is not None and state["label"] is not None:
                    wrong = logits.argmax(1) != state["label"]
                    fooled = int(wrong.sum())
                    ok = wrong.clone()
                    if budget and state["clean"] is not None:
                        norms = perturbation_norms(pixels, state["clean"].expand_as(pixels))
                        for norm, limit in budget.items():
                            ok &= norms[norm] <= limit + 1e-6
                    in_budget = int(ok.sum())
                run.records.append(QueryRecord(
                    record.index, state["image"], record.images, sent_before, record.status, record.message,
                    record.parameters, fooled, in_budget, record.seconds, self.detection_parameter))
                sent_before += record.images
            self._last.clear()

        def predict(pixels: torch.Tensor) -> torch.Tensor:
            try:
                logits = self.endpoint.logits(pixels)
            except TritonCallError as error:
                note(None, None)
                raise _Refused(error.record) from None
            note(pixels, logits)
            return logits

        query = QueryModel(predict, max_batch=self.endpoint.max_batch, description=self.endpoint.describe())
        given = None if labels is None else torch.as_tensor(labels).long().view(-1)
        for i in range(len(images)):
            clean = images[i : i + 1]
            state.update(image=i, clean=clean, label=None)
            sent_before = run.images_sent
            outcome = InputOutcome(i, -1, attempted=False)
            run.outcomes.append(outcome)
            try:
                label = given[i : i + 1] if given is not None else query.predict(clean, count=False).argmax(1)
                state["label"] = int(label)
                outcome.label = int(label)
                outcome.attempted = True
                result = make_attack(attack, query, seed=seed + i, quantize=quantize, **params)(clean, label)
            except _Refused as refused:
                outcome.stopped = f"refused: {refused.record.status}"
                outcome.sent = run.images_sent - sent_before
                LOGGER.info("input %d: call refused (%s)", i, refused.record.status)
                if self.stop_on_refusal:
                    for j in range(i + 1, len(images)):
                        run.outcomes.append(InputOutcome(j, -1, attempted=False, stopped="client stopped"))
                    break
                continue
            outcome.success = bool(result.success[0])
            outcome.label_after = int(result.labels_after[0])
            outcome.queries = float(result.queries[0]) if result.queries is not None else None
            outcome.linf = float(result.norms["linf"][0])
            outcome.l2 = float(result.norms["l2"][0])
            outcome.sent = run.images_sent - sent_before
            adversarial = result.adversarial[0]
            outcome.adversarial = ((adversarial * 255).round().to(torch.uint8) if quantize else adversarial).numpy()
        return run


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run a black-box attack against a KServe-v2 endpoint as one client")
    parser.add_argument("images", nargs="+", type=Path, help="image files (centre-cropped and resized to --size)")
    parser.add_argument("--url", required=True, help="HOST:PORT of the gRPC endpoint (Triton or the sidecar)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--attack", choices=CLIENT_ATTACKS, default="square")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="attack parameter (repeatable)")
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--client-id-key", default=DEFAULT_CLIENT_ID_KEY)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keep-going", action="store_true", help="after a refused call, go on with the next image")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificates: connect over TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM client key (mutual TLS)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate chain (mutual TLS)")
    parser.add_argument("--out", type=Path, default=None, help="write the run (every call) as JSON here")
    args = parser.parse_args(argv)
    from detector.samples import load_image_file, to_tensor

    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--param expects KEY=VALUE, got {item!r}")
        params[key.strip()] = _parse_value(value.strip())
    tls = TlsConfig(args.tls_ca, args.tls_key, args.tls_cert) if args.tls_ca or args.tls_key or args.tls_cert else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with AttackClient(args.url, args.model, client_id=args.client_id, client_id_key=args.client_id_key, tls=tls,
                      stop_on_refusal=not args.keep_going) as client:
        run = client.run(args.attack, to_tensor([load_image_file(p, args.size) for p in args.images]), params=params, seed=args.seed)
    summary = run.summary()
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(run.to_dict(), indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
