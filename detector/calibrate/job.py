"""Running a calibration job: units in order, resumable and shardable; then merge into the artifact.

``CalibrationJob.run(shard=(i, n))`` computes the units of chunks ``c`` with
``c % n == i`` (all of them for a single run), skipping every unit already in
the work directory; ``CalibrationJob.finalize()`` reads all units (from one
directory, or several shards' directories) and fits, evaluates and writes. A
single run and ``merge`` of its shards go through the same ``finalize`` over
the same unit contents, so they give the same artifact (bar ``created_at``
and the id and checksum derived from it).

The clean candidates are split by their originals (:mod:`.splits`,
:func:`.data.plan_clean_images`) into *fit* (what ``--refit-combiner`` /
``--refit-signals`` fit on), *threshold* (where the threshold is set) and
*held-out* (where the realized FPR and the per-attack results are measured);
candidates that mix splits are used for nothing (:mod:`.fit` says which rows
do what). With ``refit_signals`` the units also keep the learned signals' raw
parts and ``finalize`` refits those signals on the fit split only (out of fold
by source, :func:`detector.signals.fitting.cross_fit`) before the combiner and
thresholds are fitted; see :meth:`CalibrationJob.refit_signals`.

Progress: one tqdm bar per stage on stderr, counted in images, with ETA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.calibration import CalibrationArtifact, library_versions
from detector.combiner import Combiner
from detector.detector import Detector, resolve_detector
from detector.signals import FeatureConfig, LearnedSignal
from detector.signals.fitting import CrossFit, cross_fit, signal_values
from detector.models import ModelIdentity

from . import stages
from .access import Scorer, load_model
from .data import plan_clean_images
from .fit import AttackBank, Calibration, calibrate, concat_attack
from .spec import AttackSpec, JobConfig, JobConfigError, digest
from .splits import FIT, HOLDOUT, MIXED, THRESHOLD
from .store import WorkDir, WorkDirError
from .sufficiency import SampleSize
from .triton_query import TritonEndpoint

LOGGER = logging.getLogger("advsentry.calibrate")
VERSIONED_PACKAGES = ("scipy", "scikit-learn", "torchattacks", "adversarial-robustness-toolbox", "tritonclient")


class IncompleteJobError(RuntimeError):
    """Units are missing (a shard did not run or finish); the message names them."""


@dataclass
class RunStats:
    computed: int = 0
    reused: int = 0

    @property
    def units(self) -> int:
        return self.computed + self.reused


def detector_config(spec: str) -> tuple[dict[str, FeatureConfig], Combiner]:
    """Signals and combiner of a shipped detector (``default``, ``fixed-signals``, ``entropy-9photo``, ``paper``) or an artifact file.

    Resolved by :func:`detector.detector.resolve_detector`, the resolver every
    entry point shares (a missing or invalid file: :class:`CalibrationError`).
    """
    resolved = resolve_detector(spec)
    return dict(resolved.features), resolved.combiner


def _clean_json(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


class CalibrationJob:
    """One job over one work directory (plus, for merge, the other shards' directories)."""

    def __init__(
        self,
        config: JobConfig,
        work_dir: str | Path,
        *,
        device: str = "cpu",
        progress: bool = True,
        also: Sequence[Path] = (),
        identity: ModelIdentity | None = None,
    ) -> None:
        self.config = config
        self.store = WorkDir(work_dir, list(also))
        self.device = torch.device(device)
        self.progress = progress
        self.plan = plan_clean_images(config)
        self.features, self.combiner = detector_config(config.detector)
        if config.refit_signals and not self.learned:
            raise JobConfigError(f"--refit-signals: detector {config.detector!r} has no learned signal (lid, fourier, head) to refit")
        self._identity = identity
        self._runtime: stages.Runtime | None = None
        self.sample_size: SampleSize | None = None  # set by finalize()

    # ---- models, identity and unit keys ---------------------------------------------------------

    def runtime(self) -> stages.Runtime:
        if self._runtime is None:
            config = self.config
            endpoint = None
            if config.uses_triton:
                endpoint = TritonEndpoint(config.triton_url, config.triton_model)  # type: ignore[arg-type]
            local, identity = (None, None) if config.model == "triton" else load_model(config.model, config.weights, self.device,
                                                                                           config.contract)
            if identity is None or config.model_name or config.weights_sha256:
                identity = ModelIdentity(
                    config.model_name or (identity.name if identity else config.triton_model),
                    config.weights_sha256 or (identity.weights_sha256 if identity else "unknown"),
                )
            surrogate = load_model(config.surrogate, config.surrogate_weights, self.device)[0] if config.surrogate else None
            if local is not None:
                from detector.models import ModelContractError, check_pixel_contract

                try:
                    check_pixel_contract(local, config.image_size, f"model {config.model!r}")
                except ModelContractError as error:
                    raise JobConfigError(str(error)) from error
            if local is not None and not isinstance(local, torch.jit.ScriptModule) and any(
                    getattr(c, "layer", None) for c in self.features.values()):  # TorchScript: refused below
                self.features = self.bind_layers(local)
            scoring = dict(self.features)
            learned: dict[str, LearnedSignal] = {}
            if config.refit_signals:  # refitted at the end: scored as placeholders, their raw parts kept
                learned = dict(self.learned)
                scoring.update({name: stages.PendingRefit(signal) for name, signal in learned.items()})
            detector = Detector(scoring, combiner=self.combiner, model_identity=identity, device=self.device)
            scorer = Scorer(detector, local=None if config.scores_via_triton else local, endpoint=endpoint)
            self._identity = identity
            self._runtime = stages.Runtime(config, self.plan, scorer, local, surrogate, endpoint, self.device,
                                           learned=learned)
        return self._runtime

    def bind_layers(self, local: torch.nn.Module) -> dict[str, FeatureConfig]:
        """The detector's layers on ``local``: kept where it has them, else its layer of the same role.

        A shipped detector's layers are named after the bundled model
        (``net._blocks.10``); on another model each one moves to the layer
        that plays its role there (:mod:`detector.layers`: the block at the
        same resolution). A learned signal that moves must be refitted
        (``--refit-signals``); anything that cannot be placed is a
        :class:`JobConfigError` naming the layers the model has.
        """
        from detector.layers import LayerError, rebind_features
        from detector.models import BUNDLED_MODEL_NAME, load_bundled_model

        artifact = resolve_detector(self.config.detector).artifact
        on_bundled = artifact is None or artifact.model.name == BUNDLED_MODEL_NAME
        try:
            reference = load_bundled_model(self.device) if on_bundled and self.config.model != "bundled" else None
            features, moved = rebind_features(self.features, local, self.config.image_size, reference=reference)
        except LayerError as error:
            raise JobConfigError(f"detector {self.config.detector!r} on model {self.config.model!r}: {error}") from error
        learned_moved = sorted(name for name in moved if isinstance(features[name], LearnedSignal))
        if learned_moved and not self.config.refit_signals:
            raise JobConfigError(
                f"detector {self.config.detector!r} was fitted on another model: its learned signal(s) "
                f"{', '.join(learned_moved)} read "
                + ", ".join(f"{moved[n][0]!r}" for n in learned_moved)
                + f", which model {self.config.model!r} does not have as fitted; pass --refit-signals to fit them on "
                "this model's layers of the same role ("
                + ", ".join(f"{moved[n][1]!r}" for n in learned_moved) + ")"
            )
        for name, (old, new) in moved.items():
            LOGGER.info("signal %s: layer %s -> %s (same role on this model)", name, old, new)
        return features

    @property
    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self.runtime()
        assert self._identity is not None
        return self._identity

    @property
    def learned(self) -> dict[str, LearnedSignal]:
        """The detector's learned signals (whose parameters ``refit_signals`` refits)."""
        return {name: c for name, c in self.features.items() if isinstance(c, LearnedSignal)}

    @property
    def clean_key(self) -> str:
        c = self.config
        # units with raw parts are other units: the marker keeps jobs without --refit-signals on their old keys
        raw = ("raw parts", sorted(self.learned)) if c.refit_signals else ()
        return digest("clean", self.plan.key, self.identity.to_dict(), {k: v.to_dict() for k, v in self.features.items()},
                      c.confidence_floor, "triton" if c.scores_via_triton else "local", *raw)

    def universal_key(self, spec: AttackSpec) -> str:
        # the fit pool (fit and threshold candidates, stages.universal_pool) is part of what the perturbation depends on
        return digest("universal", self.clean_key, spec.unit_dict(), self.config.seed, self.config.quantize,
                      stages.universal_pool(self.plan))

    def attack_key(self, spec: AttackSpec) -> str:
        c = self.config
        route = "triton" if spec.scenario == "black_box_probing" and (c.query_via_triton or c.model == "triton") else "local"
        surrogate = (c.surrogate, c.surrogate_weights) if spec.transfer else None
        universal = self.universal_key(spec) if spec.scenario == "universal" else None
        return digest("attack", self.clean_key, spec.unit_dict(), c.seed, c.quantize, route, surrogate, universal)

    def job_document(self, shard: tuple[int, int]) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "identity": self.identity.to_dict(), "shard": f"{shard[0]}/{shard[1]}",
                "chunks": self.plan.n_chunks, "clean_key": self.clean_key}

    def candidate_sample_size(self) -> SampleSize:
        """Counts before any model runs: candidates and sources per split (upper bounds on what is used)."""
        counts = self.plan.split_counts()
        return SampleSize(
            clean_fit=counts[FIT]["candidates"], clean_holdout=counts[HOLDOUT]["candidates"],
            sources_fit=counts[FIT]["sources"], sources_holdout=counts[HOLDOUT]["sources"],
            target_fpr=self.config.target_fprs[0], stage="candidates",
            clean_threshold=counts[THRESHOLD]["candidates"], sources_threshold=counts[THRESHOLD]["sources"],
            refit=self.config.refit_combiner, clean_mixed=counts[MIXED]["candidates"],
        )

    # ---- running ----------------------------------------------------------------------------------

    def _bar(self, description: str, chunks: list[int]) -> Any:
        from tqdm import tqdm

        total = sum(len(self.plan.chunk(c)) for c in chunks)
        return tqdm(total=total, desc=description, unit="img", disable=not self.progress, dynamic_ncols=True, leave=True)

    def run(self, shard: tuple[int, int] = (0, 1), after_unit: Callable[[str], None] | None = None) -> RunStats:
        """Compute this shard's missing units. ``after_unit(name)`` is called after each computed unit."""
        index, count = shard
        if not 0 <= index < count:
            raise JobConfigError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
        runtime = self.runtime()
        self.store.write_job(self.job_document(shard))
        mine = [c for c in range(self.plan.n_chunks) if c % count == index]
        stats = RunStats()

        def unit(name: str, compute: Callable[[], Any]) -> Any:
            found = self.store.load(name)
            if found is not None:
                stats.reused += 1
                return found
            value = compute()
            self.store.save(name, value)
            stats.computed += 1
            if after_unit is not None:
                after_unit(name)
            return value

        clean: dict[int, dict[str, Any]] = {}
        with self._bar("clean images", mine) as bar:
            for c in mine:
                clean[c] = unit(WorkDir.unit_name("clean", self.clean_key, c), lambda c=c: stages.clean_unit(runtime, c))
                bar.update(len(self.plan.chunk(c)))
        for spec in self.config.attacks:
            perturbation = None
            if spec.scenario == "universal":
                fitted = unit(WorkDir.unit_name("universal", self.universal_key(spec)), lambda s=spec: stages.universal_fit(runtime, s))
                perturbation = fitted["perturbation"]
            key = self.attack_key(spec)
            with self._bar(f"attack {spec.label}", mine) as bar:
                for c in mine:
                    unit(WorkDir.unit_name(f"attack-{spec.label}", key, c),
                         lambda s=spec, c=c, p=perturbation: stages.attack_unit(runtime, s, c, clean[c], p))
                    bar.update(len(self.plan.chunk(c)))
        LOGGER.info("shard %d/%d: %d units computed, %d reused", index, count, stats.computed, stats.reused)
        return stats

    # ---- merging ----------------------------------------------------------------------------------

    def _collect(self) -> tuple[list[dict[str, Any]], dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]]:
        missing: list[str] = []
        clean = []
        for c in range(self.plan.n_chunks):
            found = self.store.load(WorkDir.unit_name("clean", self.clean_key, c))
            missing += [] if found is not None else [f"clean chunk {c}"]
            clean.append(found)
        attacks = {}
        for spec in self.config.attacks:
            key = self.attack_key(spec)
            units = []
            for c in range(self.plan.n_chunks):
                found = self.store.load(WorkDir.unit_name(f"attack-{spec.label}", key, c))
                missing += [] if found is not None else [f"attack {spec.label!r} chunk {c}"]
                units.append(found)
            extra: dict[str, Any] = {}
            if spec.scenario == "universal":
                fitted = self.store.load(WorkDir.unit_name("universal", self.universal_key(spec)))
                if fitted is None:
                    missing.append(f"universal fit of {spec.label!r}")
                else:
                    extra = {"universal_fitted_on": len(fitted["fitted_on"]), "universal_fooling_rate_on_fit": fitted["fooling_rate"]}
            attacks[spec.label] = (units, extra)
        if missing:
            raise IncompleteJobError(
                f"{len(missing)} work unit(s) missing, e.g. {', '.join(missing[:4])}: a shard has not run or not "
                "finished; run it (it resumes) and merge again"
            )
        return clean, attacks  # type: ignore[return-value]

    def finalize(self) -> tuple[CalibrationArtifact, Calibration, dict[str, AttackBank]]:
        """Fit and evaluate from all units; returns (artifact, calibration, attack banks)."""
        clean_units, attack_units = self._collect()
        features = len(self.features)
        selected = np.concatenate([u["indices"].numpy()[u["selected"].numpy()] for u in clean_units]).astype(np.int64)
        entropies = np.vstack([u["entropies"].numpy().reshape(-1, features) for u in clean_units])
        # each candidate's split (fit / threshold / holdout / out), and each selected clean row's
        role_of = np.array([self.plan.role(i) for i in range(len(self.plan.candidates))], dtype=str)
        banks = {spec.label: concat_attack(spec, attack_units[spec.label][0], features, attack_units[spec.label][1])
                 for spec in self.config.attacks}
        _, group_of = np.unique([c.group for c in self.plan.candidates], return_inverse=True)
        features, signal_fits = self.features, None
        if self.config.refit_signals:
            features, signal_fits = self.refit_signals(clean_units, attack_units, entropies, selected, banks, role_of, group_of)
        result = calibrate(self.config, self.combiner, entropies, role_of[selected], banks, role_of,
                           clean_groups=group_of[selected], group_of=group_of)
        self.sample_size = SampleSize(
            clean_fit=result.counts["clean_fit"], clean_holdout=result.counts["clean_holdout"],
            sources_fit=result.sources[FIT], sources_holdout=result.sources[HOLDOUT],
            target_fpr=self.config.target_fprs[0],
            adversarial_per_attack={label: int(len(result.scores[label])) for label in banks},
            clean_threshold=result.counts["clean_threshold"], sources_threshold=result.sources[THRESHOLD],
            refit=self.config.refit_combiner, clean_mixed=result.counts["clean_out"],
        )
        data = dict(self.plan.description)
        data.update(
            selected=int(len(selected)),
            clean_fit=result.counts["clean_fit"],
            clean_threshold=result.counts["clean_threshold"],
            clean_held_out=result.counts["clean_holdout"],
            clean_mixed=result.counts["clean_out"],
            labels="the model's own top-1 class on the clean image (kept when its probability >= min_confidence)",
            sample_size=self.sample_size.to_dict(),
        )
        results = {
            "operating_points": result.operating_points,
            "threshold_set_on": " + ".join(result.threshold_splits) + (" split" if len(result.threshold_splits) == 1 else " splits"),
            "attacks": result.per_attack,
            "combiner": "refitted on the fit split" if self.config.refit_combiner else f"as configured ({self.config.detector})",
        }
        if signal_fits is not None:
            results["signals"] = "refitted on the fit split, out-of-fold by source"  # threshold and held-out rows: the refitted signals
            results["signal_fits"] = signal_fits
        job = self.config.to_dict()
        job["scoring"] = "triton" if self.config.scores_via_triton else "local"
        artifact = CalibrationArtifact.create(
            result.threshold, features, self.identity, result.combiner,
            target_fpr=self.config.target_fprs[0], data=_clean_json(data), results=_clean_json(results),
            job=_clean_json(job), versions=library_versions(VERSIONED_PACKAGES),
        )
        return artifact, result, banks

    def refit_signals(
        self,
        clean_units: list[dict[str, Any]],
        attack_units: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]],
        entropies: np.ndarray,
        selected: np.ndarray,
        banks: dict[str, AttackBank],
        role_of: np.ndarray,
        group_of: np.ndarray,
    ) -> tuple[dict[str, FeatureConfig], dict[str, dict[str, Any]]]:
        """Refit every learned signal on the fit split; rewrite its column in ``entropies`` and the banks in place.

        ``role_of`` is each candidate's split (``"fit"``, ``"threshold"``,
        ``"holdout"``, ``"out"``). Fit rows: the selected clean images of the
        *fit* split and the successful adversarials of fit-split images, every
        attack weighted equally, grouped by source. Their column becomes
        out-of-fold values (each from the signal fitted without the row's
        source), so the combiner fitted next never reads a value from a signal
        that saw its source. Every other row (threshold, held-out, clean and
        adversarial) gets the values of the signal fitted on all fit rows, the
        one the artifact ships: the threshold is then set, and the realized FPR
        measured, exactly as the sidecar will score, on rows no signal was
        fitted on. Rows of the ``"out"`` role (candidates that mix splits) get
        those values too but are used for nothing. Returns the features with
        the refitted signals, and what each fit used.
        """
        names = list(self.features)
        role_of = np.asarray(role_of).astype(str)
        clean_fit = role_of[selected] == FIT
        fit_of = {label: role_of[bank.success_indices] == FIT for label, bank in banks.items()}
        weights = [np.full(int(clean_fit.sum()), 1.0 / max(int(clean_fit.sum()), 1))]
        weights += [np.full(int(fit.sum()), 1.0 / max(int(fit.sum()), 1)) for fit in fit_of.values()]
        weight = np.concatenate(weights)
        n_clean = int(clean_fit.sum())
        is_clean = np.arange(len(weight)) < n_clean
        if n_clean == 0:
            raise ValueError("--refit-signals: no selected clean image in the fit split to fit the learned signals on; "
                             "add images or lower --holdout / --threshold-split")
        if is_clean.all():
            raise ValueError("--refit-signals: no successful adversarial of a fit-split image to fit the learned signals on; "
                             "add images or attacks")
        groups = np.concatenate([group_of[selected][clean_fit], *[group_of[b.success_indices][fit_of[label]]
                                                                   for label, b in banks.items()]])
        features = dict(self.features)
        fits: dict[str, dict[str, Any]] = {}

        def rows(units: list[dict[str, Any]], name: str) -> torch.Tensor:  # a unit's raw rows follow its scored rows
            parts = [u["raw"][name] for u in units if len(u["entropies"])]
            return torch.cat(parts) if parts else torch.zeros(0)

        for name, template in self.learned.items():
            column = names.index(name)
            clean_raw = rows(clean_units, name)
            attack_raw = {label: rows(attack_units[label][0], name) for label in banks}
            if len(clean_raw) != len(entropies) or any(len(attack_raw[l]) != len(b.entropies) for l, b in banks.items()):
                raise RuntimeError(f"learned signal {name!r}: raw parts and scored rows differ in number (units of another job?)")
            parts = [clean_raw[torch.from_numpy(clean_fit)], *[attack_raw[label][torch.from_numpy(fit_of[label])] for label in banks]]
            raw = torch.cat([part for part in parts if len(part)])
            try:
                result: CrossFit = cross_fit(template, raw, groups, is_clean, ~is_clean, weight, seed=self.config.seed, name=name)
            except (ValueError, RuntimeError) as error:
                raise ValueError(f"--refit-signals: learned signal {name!r} cannot be fitted on the fit split "
                                 f"({n_clean} clean, {len(weight) - n_clean} adversarial rows): {error}; add images") from error
            signal = result.signal
            entropies[clean_fit, column] = result.out_of_fold[:n_clean]
            entropies[~clean_fit, column] = signal_values(signal, clean_raw[torch.from_numpy(~clean_fit)])
            start = n_clean
            for label, bank in banks.items():
                fit = fit_of[label]
                bank.entropies[fit, column] = result.out_of_fold[start : start + int(fit.sum())]
                bank.entropies[~fit, column] = signal_values(signal, attack_raw[label][torch.from_numpy(~fit)])
                start += int(fit.sum())
            features[name] = signal
            fits[name] = {
                "clean_rows": n_clean, "adversarial_rows": int(len(weight) - n_clean),
                "sources": int(len(np.unique(groups))), "folds": result.folds,
                "folds_not_out_of_fold": list(result.fallback_folds),
            }
            if result.fallback_folds:
                LOGGER.warning("learned signal %s: fold(s) %s could not be fitted without their sources (too few fit rows); "
                               "their rows' values are in-sample", name, list(result.fallback_folds))
            LOGGER.info("learned signal %s refitted on %d fit rows (%d folds by source)", name, len(weight), result.folds)
        return features, fits


def merge_job(dirs: Sequence[str | Path], *, progress: bool = False) -> CalibrationJob:
    """A job over several shard directories, checked to be shards of one job."""
    if not dirs:
        raise WorkDirError("merge needs at least one work directory")
    documents = [WorkDir.read_job(d) for d in dirs]
    first = JobConfig.from_dict(documents[0]["config"])
    for directory, document in zip(dirs[1:], documents[1:]):
        other = JobConfig.from_dict(document["config"])
        differences = first.differences(other)
        if differences:
            raise WorkDirError(f"{directory} ran another job than {dirs[0]}: " + "; ".join(differences))
        if document["identity"] != documents[0]["identity"]:
            raise WorkDirError(f"{directory} ran on other model weights ({document['identity']} != {documents[0]['identity']})")
    identity = ModelIdentity(**documents[0]["identity"])
    return CalibrationJob(first, dirs[0], also=[Path(d) for d in dirs[1:]], identity=identity, progress=progress)
