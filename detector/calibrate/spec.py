"""What a calibration job is: its settings (:class:`JobConfig`) and its attacks (:class:`AttackSpec`).

Both are plain, JSON-serializable dataclasses. The job's settings travel with
the work directory (``job.json``) so that ``calibrate merge`` can check that
every shard ran the same job, and they are recorded in the artifact and the
report ("the settings used").

Attack specs are written on the command line as
``NAME[:key=value,key=value...]`` where NAME is a registry attack
(``advsentry attack --list``) and the keys are that attack's parameters plus
these job-level ones:

- ``as=LABEL``: the row name in tables (default: NAME, or NAME_2 ... when repeated);
- ``targeted=true``: targeted variant, the target class drawn per image from the seed;
- ``transfer=true``: black box *without* probing: craft on the surrogate model
  (``--surrogate``), count success on the protected model;
- ``limit=N``: attack only selected images among the first N candidates (for
  expensive attacks; candidates are interleaved across source photos);
- ``fit=false``: evaluated only, never fitted on: ``--refit-combiner`` /
  ``--refit-signals`` leave its adversarials out, so its results say how the
  detector meets an attack it was not trained against (``"combiner": "unseen"``).

The scenario follows from the attack's family: white-box attacks run on the
local model, query-based ones (boundary, hopskipjump, square, one_pixel) reach
the model only through predictions (a Triton endpoint with ``--query-url``),
``universal`` fits one perturbation on images of the fit and threshold splits
(never held-out ones) and applies it to all.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detector.contract import InputContract

SCENARIOS = ("white_box", "black_box_probing", "black_box_transfer", "universal")
CLEAN_SOURCES = ("auto", "corpus", "bundled")
#: Default cap on corpus images. Why 600: with the default half held out and the
#: 0.3 confidence floor, it is about the smallest number that can meet the
#: minimums (200 clean held-out images, see :mod:`.sufficiency`); the four
#: default attacks take roughly 10-40 minutes on 2 CPU cores for it. (The corpus
#: has about 570 dev images from 230 sources, all above the floor: about 290
#: held-out images from 115 sources, enough; --max-images 300 is not.)
DEFAULT_CORPUS_IMAGES = 600


class JobConfigError(ValueError):
    """Invalid calibration settings (the message says which and why)."""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the job: registry name, its parameters, and how it is run."""

    label: str
    attack: str
    params: dict[str, Any] = field(default_factory=dict)
    targeted: bool = False
    transfer: bool = False
    limit: int | None = None
    fit: bool = True  # False: evaluated only, the combiner never sees its adversarials

    @property
    def scenario(self) -> str:
        from detector.attacks import ATTACKS

        family = ATTACKS[self.attack].family
        if self.transfer:
            return "black_box_transfer"
        return family if family in SCENARIOS else "white_box"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unit_dict(self) -> dict[str, Any]:
        """What decides the attack's adversarials (a work unit's key): ``fit`` does not, so units are shared."""
        data = self.to_dict()
        del data["fit"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttackSpec":
        return cls(**data)

    @classmethod
    def parse(cls, text: str) -> "AttackSpec":
        """``"pgd_linf:eps=0.0078,steps=5,as=pgd2"`` -> spec (validated against the registry)."""
        from detector.attacks import ATTACKS

        name, _, rest = text.partition(":")
        name = name.strip()
        if name not in ATTACKS:
            raise JobConfigError(f"unknown attack {name!r} in {text!r}; known: {', '.join(ATTACKS)}")
        cls_ = ATTACKS[name]
        if cls_.family == "fooling":
            raise JobConfigError(f"{name}: fooling images have no clean counterpart and cannot calibrate a threshold")
        params: dict[str, Any] = {}
        job: dict[str, Any] = {"as": name, "targeted": False, "transfer": False, "limit": None, "fit": True}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise JobConfigError(f"attack {text!r}: expected key=value, got {item!r}")
            key = key.strip()
            (job if key in job else params)[key] = _parse_value(value.strip())
        unknown = sorted(set(params) - set(cls_.defaults))
        if unknown:
            raise JobConfigError(f"attack {name}: unknown parameter(s) {unknown}; known: {sorted(cls_.defaults)}")
        if job["targeted"] and not cls_.supports_targeted:
            raise JobConfigError(f"attack {name} has no targeted variant")
        if job["transfer"] and cls_.family != "white_box":
            raise JobConfigError(f"transfer=true needs a white-box attack crafted on the surrogate, not {name}")
        limit = job["limit"]
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise JobConfigError(f"attack {text!r}: limit must be a positive integer")
        if not isinstance(job["fit"], bool):
            raise JobConfigError(f"attack {text!r}: fit must be true or false")
        return cls(str(job["as"]), name, params, bool(job["targeted"]), bool(job["transfer"]), limit, job["fit"])

    def seed_for(self, seed: int, chunk: int) -> int:
        """Per-(attack, chunk) seed: independent of which shard or process runs the chunk."""
        return (seed * 1_000_003 + zlib.crc32(self.label.encode()) + 7919 * chunk) % (2**31 - 1)


#: Cheap attacks that make a calibration on ~20 crops finish in about a minute on 2 cores.
DEFAULT_ATTACKS: tuple[str, ...] = (
    "fgsm:eps=0.00784",
    "pgd_linf:eps=0.00784,alpha=0.00392,steps=5",
    "gradient_l2:eps=1.0",
    "square:eps=0.0157,n_queries=100",
)


@dataclass(frozen=True)
class JobConfig:
    """All settings of one calibration job (``--shard`` excepted: shards share one job)."""

    # the protected model
    model: str = "bundled"  # bundled | FILE (TorchScript) | pkg.module:factory | triton
    weights: str | None = None  # state dict for a factory
    input_contract: dict[str, Any] | None = None  # what the user's module takes (detector.contract); None: our pixels
    model_name: str | None = None  # identity overrides (needed for model=triton)
    weights_sha256: str | None = None
    triton_url: str | None = None
    triton_model: str | None = None
    query_via_triton: bool = False  # black-box probing attacks query --triton-url
    score_via_triton: bool = False  # labels and feature maps from --triton-url (e.g. for a TorchScript model)
    surrogate: str | None = None  # transfer attacks: bundled | FILE | pkg.module:factory
    surrogate_weights: str | None = None
    # clean images
    images: tuple[str, ...] = ()  # folders / files; empty = the corpus or the bundled photos (clean_source)
    clean_source: str = "auto"  # without images: auto | corpus | bundled (see :meth:`resolved_clean_source`)
    corpus: str | None = None  # corpus root; None: $ADVSENTRY_CORPUS_DIR or ~/.cache/advsentry/corpus
    max_images: int | None = None  # cap on candidates; None: DEFAULT_CORPUS_IMAGES for the corpus, no cap otherwise
    crops_per_photo: int = 2
    min_confidence: float | None = None  # None: 0.3 for bundled crops and the corpus, 0.0 for user images
    image_size: int = 224
    #: share of the originals (photos, files, corpus cut-outs and backgrounds) whose images measure the FPR
    holdout: float = 0.5
    #: share of the originals whose clean images set the threshold and nothing else; the rest is the fit split.
    #: Why apart from the fit split: a refitted combiner makes its own training rows look cleaner than unseen
    #: ones, so a threshold set on them is too low. Without a refit nothing is fitted on the fit split and the
    #: threshold is set on the fit and threshold splits together (no leak, more rows: a more precise threshold).
    threshold_split: float = 0.25
    # attacks
    attacks: tuple[AttackSpec, ...] = ()
    quantize: bool = True
    # the detector and the threshold
    detector: str = "default"  # default | paper | FILE (artifact whose maps/combiner are used)
    refit_combiner: bool = False
    #: refit the detector's learned signals (LID, Fourier, heads) on the fit split, out of fold by source;
    #: implies ``refit_combiner`` (set here: a combiner fitted on the old signals' scale would be meaningless)
    refit_signals: bool = False
    target_fprs: tuple[float, ...] = (0.05,)
    n_boot: int = 1000
    # execution
    seed: int = 0
    chunk_size: int = 8
    example_chunks: int = 2

    def __post_init__(self) -> None:
        if not self.target_fprs or not all(0.0 < f < 1.0 for f in self.target_fprs):
            raise JobConfigError(f"target FPRs must be in (0, 1), got {list(self.target_fprs)}")
        if not 0.0 < self.holdout < 1.0:
            raise JobConfigError(f"holdout must be in (0, 1), got {self.holdout}")
        if not 0.0 < self.threshold_split < 1.0 or self.holdout + self.threshold_split >= 1.0:
            raise JobConfigError(
                f"threshold split must be in (0, 1) and leave a fit split (holdout + threshold split < 1), got threshold "
                f"split {self.threshold_split} with holdout {self.holdout}"
            )
        if self.chunk_size < 1 or self.crops_per_photo < 1:
            raise JobConfigError("chunk size and crops per photo must be positive")
        if self.clean_source not in CLEAN_SOURCES:
            raise JobConfigError(f"clean source must be one of {', '.join(CLEAN_SOURCES)}, got {self.clean_source!r}")
        if self.images and self.clean_source == "bundled":
            raise JobConfigError("--images and --clean-source bundled exclude each other (add the real-photo corpus "
                                 "to your images with --clean-source corpus)")
        if self.corpus and (self.clean_source == "bundled" or (self.images and self.clean_source != "corpus")):
            raise JobConfigError("--corpus names the corpus to use; it makes no sense with --clean-source bundled, "
                                 "nor with --images unless --clean-source corpus adds it to them")
        if self.input_contract is not None:
            from detector.contract import ContractError

            try:
                contract = self.contract
            except ContractError as error:
                raise JobConfigError(str(error)) from error
            if not contract.is_default and self.model in ("bundled", "triton"):
                raise JobConfigError(f"--input-* flags declare how your own model takes its input; --model {self.model} "
                                     "takes advsentry's pixels")
        if self.max_images is not None and self.max_images < 2:
            raise JobConfigError(f"max images must be at least 2 (one per split), got {self.max_images}")
        labels = [a.label for a in self.attacks]
        if len(set(labels)) != len(labels):
            raise JobConfigError(f"attack labels must be unique (use as=LABEL), got {labels}")
        if self.uses_triton and not (self.triton_url and self.triton_model):
            raise JobConfigError("a Triton model needs --triton-url and --triton-model")
        if self.refit_signals and self.scores_via_triton:
            raise JobConfigError(
                "--refit-signals needs the raw parts of the learned signals (activations of the model's layers), which "
                "only a local model gives; it cannot run with --model triton or --score-via-triton"
            )
        if self.refit_signals and not self.refit_combiner:
            object.__setattr__(self, "refit_combiner", True)  # the combiner must be refitted on the new signals
        if self.model == "triton":
            white = [a.label for a in self.attacks if a.scenario in ("white_box", "universal")]
            if white:
                raise JobConfigError(
                    f"attack(s) {white} need gradients of a local model, but --model triton gives prediction "
                    "access only; add the local model (--model ...) or use black-box attacks / transfer=true"
                )
        if any(a.transfer for a in self.attacks) and not self.surrogate:
            raise JobConfigError("transfer=true attacks need --surrogate (the model they are crafted on)")

    @property
    def contract(self) -> "InputContract":
        from detector.contract import InputContract

        return InputContract.from_dict(self.input_contract)

    @property
    def uses_triton(self) -> bool:
        return self.model == "triton" or self.query_via_triton or self.score_via_triton

    @property
    def scores_via_triton(self) -> bool:
        return self.model == "triton" or self.score_via_triton

    @property
    def bundled_images(self) -> bool:
        """No ``--images``: the clean images come with advsentry (the corpus or the bundled photos)."""
        return not self.images

    def resolved_clean_source(self) -> str:
        """``"files"`` (``--images``), ``"corpus"``, ``"corpus+files"`` or ``"bundled"``: where the clean images come from.

        ``--images`` with ``--clean-source corpus``: both, the user's files and
        the corpus's dev part (capped by ``--max-images``) in one job, so a
        user's few images of their own domain are joined by many real photos
        from many sources (what the held-out FPR's interval needs).

        ``auto`` takes the real-photo corpus only when it is installed *and* the
        model is the bundled one: the corpus was collected and labelled for the
        bundled ImageNet classifier, and a user's model with its own classes is
        better served by its own ``--images``. ``corpus`` (or naming one with
        ``corpus``) insists (an error when none is installed), ``bundled``
        never looks for one.
        """
        if self.images:
            return "corpus+files" if self.clean_source == "corpus" else "files"
        if self.clean_source == "auto" and self.corpus:
            return "corpus"  # naming a corpus asks for it: a missing one is an error, not a silent fallback
        if self.clean_source == "auto":
            try:
                from detector.corpus import corpus_installed
            except ImportError:  # an advsentry without the corpus module: there is no corpus to use
                return "bundled"
            installed = corpus_installed(Path(self.corpus) if self.corpus else None)
            return "corpus" if installed and self.model == "bundled" else "bundled"
        return self.clean_source

    @property
    def image_cap(self) -> int | None:
        """The cap on candidates: ``max_images``, else :data:`DEFAULT_CORPUS_IMAGES` for the corpus, else none."""
        if self.max_images is not None:
            return self.max_images
        return DEFAULT_CORPUS_IMAGES if self.resolved_clean_source() in ("corpus", "corpus+files") else None

    @property
    def confidence_floor(self) -> float:
        if self.min_confidence is not None:
            return float(self.min_confidence)
        return 0.3 if self.bundled_images else 0.0

    def to_dict(self) -> dict[str, Any]:
        document = {f.name: getattr(self, f.name) for f in fields(self)}
        document["attacks"] = [a.to_dict() for a in self.attacks]
        document["images"] = list(self.images)
        document["target_fprs"] = list(self.target_fprs)
        return document

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobConfigError(f"unknown job setting(s): {', '.join(unknown)}")
        values = dict(data)
        values["attacks"] = tuple(AttackSpec.from_dict(a) for a in data.get("attacks", ()))
        values["images"] = tuple(data.get("images", ()))
        values["target_fprs"] = tuple(float(f) for f in data.get("target_fprs", (0.05,)))
        return cls(**values)

    def differences(self, other: "JobConfig") -> list[str]:
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: {mine[key]!r} != {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]


def digest(*parts: Any) -> str:
    """Short content key of JSON-able parts (names the cached work units)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
