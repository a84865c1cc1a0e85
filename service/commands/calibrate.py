"""``advsentry calibrate``: threshold calibration jobs (``run``, ``merge``, ``verify``, ``traffic``).

``calibrate run`` attacks clean images with the chosen attacks, scores clean
and adversarial images exactly as the sidecar will, splits the clean images by
their originals (photos, files) into three splits (fit: what
``--refit-combiner`` / ``--refit-signals`` fit on; threshold, ``--threshold-split``:
where the threshold is set; held-out, ``--holdout``: where the realized FPR is
measured), prints for each target FPR the threshold, the split that set it and
the realized held-out FPR with its exact interval beside the target, and
writes the artifact ``advsentry serve --calibration`` loads plus an HTML
report. Work is kept in ``--work-dir``: a
killed run resumes where it stopped; ``--shard i/n`` computes one part and
``calibrate merge`` combines the parts into the artifact a single run gives.
``calibrate verify`` checks an artifact (schema, checksum, and optionally
that it fits a model) the way the sidecar does before loading it.
``calibrate traffic`` derives a threshold from the score sketches sidecars
keep of live traffic (issue 12; ``service/traffic_calibration.py``).

Clean images: ``--images``, else the real-photo corpus's dev part when it is
installed (and the model is the bundled one), else the bundled photos
(``--clean-source`` chooses explicitly). Below the documented minimum sample
sizes the job warns loudly on stderr at its start and end and marks the
report (``--min-samples warn``), refuses (``strict``, exit 2), or only records
them in the artifact (``off``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .contract_options import InputDtype, InputLayout, InputNormalize, InputScale, input_contract
from .exits import EXIT_CALIBRATION_ERROR, EXIT_FAILURE, EXIT_INPUT_ERROR, EXIT_USAGE, fail

calibrate_app = typer.Typer(
    name="calibrate",
    help="Calibrate the detector's threshold on your model and images (run, merge, verify).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    index, sep, count = text.partition("/")
    try:
        value = int(index), int(count)
    except ValueError:
        fail(f"--shard must look like i/n (e.g. 0/4), got {text!r}", EXIT_USAGE)
    if not sep or not 0 <= value[0] < value[1]:
        fail(f"--shard must be i/n with 0 <= i < n, got {text!r}", EXIT_USAGE)
    return value


def _summary(artifact) -> str:  # type: ignore[no-untyped-def]
    """Threshold; per target FPR the split that set it and the realized held-out FPR (exact interval) beside the target;
    per attack the AUC (by source) and TPR at the threshold."""
    from detector.calibrate.report import auc_text, operating_point_line, rate_text

    lines = [f"calibration {artifact.id}: threshold {artifact.threshold:.6f} (target FPR {artifact.target_fpr})"]
    size = artifact.data.get("sample_size") or {}
    if size:
        threshold = (f"{size.get('clean_threshold')} threshold ({size.get('sources_threshold')} sources), "
                     if "clean_threshold" in size else "")
        mixed = f", {size['clean_mixed']} mixing splits (unused)" if size.get("clean_mixed") else ""
        lines.append(f"  clean images: {size.get('clean_fit')} fit ({size.get('sources_fit')} sources), {threshold}"
                     f"{size.get('clean_holdout')} held-out ({size.get('sources_holdout')} sources){mixed}"
                     + ("" if size.get("sufficient", True) else "  << BELOW THE MINIMUMS, see the warning"))
    for point in artifact.results.get("operating_points", ()):
        lines.append(f"  {operating_point_line(point)}")
    primary = f"{artifact.target_fpr:g}" if artifact.target_fpr is not None else None
    for label, attack in (artifact.results.get("attacks") or {}).items():
        if "detection" not in attack:
            continue
        tpr = (attack.get("tpr_at_threshold_interval") or {}).get(primary)
        lines.append(f"  {label}: AUC {auc_text(attack)}, TPR at threshold {rate_text(tpr)}")
    return "\n".join(lines)


@calibrate_app.command("run")
def run(
    out: Annotated[Optional[Path], typer.Option(help="Artifact to write (JSON); not with --shard.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="HTML report to write.")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="Finished work units (resume, shards); default OUT.work/.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="Compute part i of n (i/n); combine with `calibrate merge`.")] = None,
    model: Annotated[str, typer.Option(help="bundled | TorchScript FILE | pkg.module:factory | triton.")] = "bundled",
    weights: Annotated[Optional[Path], typer.Option(help="State dict for a pkg.module:factory model.")] = None,
    input_layout: InputLayout = "nchw",
    input_scale: InputScale = 1.0,
    input_normalize: InputNormalize = None,
    input_dtype: InputDtype = "float32",
    model_name: Annotated[Optional[str], typer.Option(help="Model name recorded in the artifact (default: from --model).")] = None,
    weights_sha256: Annotated[Optional[str], typer.Option(help="Weights hash recorded in the artifact (needed for --model triton to match a sidecar that knows the weights).")] = None,
    triton_url: Annotated[Optional[str], typer.Option(help="Triton gRPC endpoint HOST:PORT (for --model triton or --query-via-triton).")] = None,
    triton_model: Annotated[Optional[str], typer.Option(help="Model name on the Triton endpoint.")] = None,
    query_via_triton: Annotated[bool, typer.Option("--query-via-triton", help="Black-box probing attacks query the Triton endpoint (counted), not the local model.")] = False,
    score_via_triton: Annotated[bool, typer.Option("--score-via-triton", help="Labels and feature maps come from the Triton endpoint (e.g. for a TorchScript --model).")] = False,
    surrogate: Annotated[Optional[str], typer.Option(help="Surrogate model for transfer=true attacks (same forms as --model).")] = None,
    surrogate_weights: Annotated[Optional[Path], typer.Option(help="State dict for a factory surrogate.")] = None,
    images: Annotated[Optional[list[Path]], typer.Option("--images", help="Clean image folder or file (repeatable); default: see --clean-source.")] = None,
    clean_source: Annotated[str, typer.Option(help="Without --images: auto (the real-photo corpus's dev part when installed and the model is bundled, else the bundled photos) | corpus | bundled. With --images: corpus adds the corpus's dev part to your images.")] = "auto",
    corpus: Annotated[Optional[Path], typer.Option(help="Corpus root (default: $ADVSENTRY_CORPUS_DIR, else ~/.cache/advsentry/corpus).")] = None,
    max_images: Annotated[Optional[int], typer.Option(min=2, help="Use at most this many clean candidates (bounds run time); default 600 from the corpus, all otherwise.")] = None,
    min_samples: Annotated[str, typer.Option(help="Below the minimum sample sizes: warn (loudly, default), strict (refuse, exit 2), off (only record them).")] = "warn",
    crops_per_photo: Annotated[int, typer.Option(min=1, help="Bundled photos: random crops per photo.")] = 2,
    min_confidence: Annotated[Optional[float], typer.Option(help="Keep clean images whose top-1 probability is at least this (default 0.3 bundled, 0 user images).")] = None,
    image_size: Annotated[int, typer.Option(min=8, help="Images are centre-cropped and resized to this side.")] = 224,
    holdout: Annotated[float, typer.Option(help="Share of originals (photos/files) held out to measure the realized FPR (and the per-attack results).")] = 0.5,
    threshold_split: Annotated[float, typer.Option(help="Share of originals (photos/files) whose clean images set the threshold and nothing else; the rest (1 - holdout - threshold split) is the fit split that --refit-combiner / --refit-signals fit on. Apart because a refitted combiner makes its own training images look cleaner than new ones, so a threshold set on them is too low. Without a refit the threshold is set on the fit and threshold splits together.")] = 0.25,
    attack: Annotated[Optional[list[str]], typer.Option("--attack", help="NAME[:key=value,...] (repeatable); keys: the attack's params, as=, targeted=, transfer=, limit=.")] = None,
    quantize: Annotated[bool, typer.Option("--quantize/--no-quantize", help="Adversarials on the 8-bit grid.")] = True,
    detector: Annotated[str, typer.Option(help="Detector signals/combiner: default (the corpus study's choice), fixed-signals (its choice without learned signals), entropy-9photo (the 9-photo study's), paper, or an artifact FILE.")] = "default",
    refit_combiner: Annotated[bool, typer.Option("--refit-combiner", help="Fit a logistic combiner over the maps on the fit split.")] = False,
    refit_signals: Annotated[bool, typer.Option("--refit-signals", help="Also refit the learned signals (lid, fourier, head) on the fit split, out of fold by source; implies --refit-combiner; needs a local model.")] = False,
    target_fpr: Annotated[Optional[list[float]], typer.Option("--target-fpr", help="Target FPR (repeatable; the first is put in force).")] = None,
    n_boot: Annotated[int, typer.Option(min=10, help="Bootstrap resamples for the intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of crops, split, attacks, bootstrap.")] = 0,
    chunk_size: Annotated[int, typer.Option(min=1, help="Images per work unit (changing it changes the units).")] = 8,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars with ETA on stderr.")] = True,
    list_attacks: Annotated[bool, typer.Option("--list-attacks", help="List attacks and their parameters, then exit.")] = False,
) -> None:
    """Generate adversarials, fit the threshold for the target FPR, write artifact + report.

    Exit codes: 0 ok, 2 usage / invalid settings, 3 bad input images, 1 other.
    """
    from detector.attacks import ATTACKS

    if list_attacks:
        for name, cls in ATTACKS.items():
            if cls.family != "fooling":
                typer.echo(f"{name:12s} {cls.family:18s} defaults={dict(cls.defaults)}")
        raise typer.Exit(0)
    parts = _shard(shard)
    if parts[1] == 1 and out is None:
        fail("--out is required (unless --shard i/n, whose parts `calibrate merge` combines)", EXIT_USAGE)
    if parts[1] > 1 and work_dir is None:
        fail("--shard needs --work-dir (where this part's units go)", EXIT_USAGE)
    work = work_dir or Path(f"{out}.work")

    from detector.calibrate import DEFAULT_ATTACKS, AttackSpec, JobConfig, JobConfigError, run_calibration

    try:
        config = JobConfig(
            model=model, weights=str(weights) if weights else None, model_name=model_name, weights_sha256=weights_sha256,
            input_contract=_contract_dict(input_contract(input_layout, input_scale, input_normalize, input_dtype)),
            triton_url=triton_url, triton_model=triton_model, query_via_triton=query_via_triton,
            score_via_triton=score_via_triton,
            surrogate=surrogate, surrogate_weights=str(surrogate_weights) if surrogate_weights else None,
            images=tuple(str(p) for p in images or ()), clean_source=clean_source,
            corpus=str(corpus) if corpus else None, max_images=max_images,
            crops_per_photo=crops_per_photo, min_confidence=min_confidence,
            image_size=image_size, holdout=holdout, threshold_split=threshold_split,
            attacks=tuple(AttackSpec.parse(text) for text in (attack or DEFAULT_ATTACKS)), quantize=quantize,
            detector=detector, refit_combiner=refit_combiner, refit_signals=refit_signals, target_fprs=tuple(target_fpr or (0.05,)),
            n_boot=n_boot, seed=seed, chunk_size=chunk_size,
        )
    except JobConfigError as error:
        fail(str(error), EXIT_USAGE)
    _check_policy(min_samples)
    _execute(lambda: run_calibration(config, work, out=out, report=report, shard=parts, device=device, progress=progress,
                                     min_samples=min_samples),
             out, report, parts)


def _contract_dict(contract) -> dict | None:  # type: ignore[no-untyped-def, type-arg]
    """The job records a contract only when one is declared (older jobs, and most, have none)."""
    return None if contract.is_default else contract.to_dict()


def _check_policy(min_samples: str) -> None:
    from detector.calibrate import POLICIES

    if min_samples not in POLICIES:
        fail(f"--min-samples must be one of {', '.join(POLICIES)}, got {min_samples!r}", EXIT_USAGE)


def _execute(action, out, report, parts) -> None:  # type: ignore[no-untyped-def]
    from detector.calibrate import IncompleteJobError, JobConfigError, WorkDirError
    from detector.calibrate.triton_query import TritonEndpointError
    from detector.calibration import CalibrationError

    try:
        result = action()
    except JobConfigError as error:
        fail(str(error), EXIT_USAGE)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, CalibrationError):
            fail(str(error), EXIT_CALIBRATION_ERROR)
        fail(str(error), EXIT_INPUT_ERROR)
    except (IncompleteJobError, WorkDirError, TritonEndpointError) as error:
        fail(str(error), EXIT_FAILURE)
    if parts[1] > 1:
        typer.echo(f"shard {parts[0]}/{parts[1]}: {result.computed} unit(s) computed, {result.reused} reused", err=True)
        return
    typer.echo(_summary(result))
    typer.echo(f"wrote {out}" + (f" and {report}" if report else ""))


@calibrate_app.command("merge")
def merge(
    work_dirs: Annotated[list[Path], typer.Argument(help="The shards' work directories (all parts of one job).")],
    out: Annotated[Path, typer.Option(help="Artifact to write (JSON).")],
    report: Annotated[Optional[Path], typer.Option(help="HTML report to write.")] = None,
    min_samples: Annotated[str, typer.Option(help="Below the minimum sample sizes: warn (default), strict (refuse, exit 2), off.")] = "warn",
) -> None:
    """Combine the parts of a sharded job into the artifact (and report) a single run gives."""
    from detector.calibrate import merge_calibration

    _check_policy(min_samples)
    _execute(lambda: merge_calibration(list(work_dirs), out=out, report=report, min_samples=min_samples), out, report, (0, 1))


@calibrate_app.command("verify")
def verify(
    artifact: Annotated[Path, typer.Argument(help="Calibration artifact (JSON).")],
    model: Annotated[Optional[str], typer.Option(help="Also check it fits this model: bundled | FILE | pkg.module:factory.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="State dict for a factory model.")] = None,
    input_layout: InputLayout = "nchw",
    input_scale: InputScale = 1.0,
    input_normalize: InputNormalize = None,
    input_dtype: InputDtype = "float32",
    detector: Annotated[Optional[str], typer.Option(help="Also check it fits this detector: default | fixed-signals | entropy-9photo | paper | artifact FILE.")] = None,
) -> None:
    """Check an artifact as the sidecar does (schema, checksum, model and detector match). Exit 4 if refused."""
    from detector.calibration import CalibrationArtifact, CalibrationError

    try:
        loaded = CalibrationArtifact.load(artifact)
        features = loaded.features
        if detector is not None:
            from detector.calibrate.job import detector_config

            features = detector_config(detector)[0]
        identity = None
        if model is not None:
            from detector.calibrate.access import load_model

            identity = load_model(model, str(weights) if weights else None,
                                  contract=input_contract(input_layout, input_scale, input_normalize, input_dtype))[1]
        problems = loaded.mismatches(features, identity)
        if problems:
            raise CalibrationError(f"{artifact} does not match: " + "; ".join(problems))
    except CalibrationError as error:
        fail(str(error), EXIT_CALIBRATION_ERROR)
    typer.echo(_summary(loaded))
    typer.echo(f"model {loaded.model.name} sha256 {loaded.model.weights_sha256}; maps {', '.join(loaded.features)}; "
               f"combiner {loaded.combiner.kind}: OK")


# --- calibrate traffic (issue 12) ---
@calibrate_app.command("traffic")
def traffic(
    sources: Annotated[str, typer.Option("--from", help="Comma-separated sidecars (HOST:PORT, via GetTrafficState) and/or traffic state files (traffic_state_path); their sketches are merged.")],
    target_fpr: Annotated[float, typer.Option(help="Share of the (clean) traffic the threshold may flag.")],
    out: Annotated[Path, typer.Option(help="Artifact to write (JSON, atomically; point a sidecar's calibration at it to hot-reload).")],
    base: Annotated[Optional[str], typer.Option(help="The artifact in force while the traffic was seen (FILE or shipped name): its maps and combiner are kept and only its series is used. Default: the shipped default detector.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Protected model whose traffic to use (needed when the sources hold several).")] = None,
    trim: Annotated[float, typer.Option(help="Assume up to this share of the traffic is adversarial (scores above the threshold): take the (1 - trim)(1 - target) quantile. 0: none.")] = 0.0,
    metadata: Annotated[Optional[list[str]], typer.Option("--metadata", help="KEY=VALUE gRPC metadata sent to HOST:PORT sources (e.g. the trusted_metadata header; repeatable).")] = None,
    ca_file: Annotated[Optional[Path], typer.Option(help="PEM CA bundle for HOST:PORT sources served over TLS.")] = None,
) -> None:
    """A threshold from the score sketches sidecars kept of live traffic (traffic_state_path / GetTrafficState).

    The threshold is the (1 - trim)(1 - target) quantile of the merged traffic
    scores of --model under the --base calibration (DDSketch: within its
    relative accuracy, 0.5 % by default, of the exact quantile).

    Traffic holds attacks, and that biases the threshold. Without --trim, the
    attacks sit in the upper tail and push the threshold up: on clean inputs
    the FPR is at most the target (fewer alarms), at the cost of more missed
    attacks; when the share of attacks nears the target the threshold climbs
    into the attacks' own scores. --trim r assumes up to a share r is
    adversarial: exact when r attacks are all caught, but with fewer attacks
    than r the clean FPR rises up to target + r (more alarms). Unlabelled
    traffic cannot tell the two apart; pick r from what you know of the
    traffic (e.g. shadow-mode flag rates, a labelled sample).

    Exit codes: 0 ok, 2 usage / unusable sources, 4 base artifact refused.
    """
    from service.traffic_calibration import TrafficCalibrationError, calibrate_from_traffic, write
    from detector.calibration import CalibrationArtifact, CalibrationError
    from detector.detector import resolve_artifact

    pairs = []
    for item in metadata or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--metadata must be KEY=VALUE, got {item!r}", EXIT_USAGE)
        pairs.append((key.lower(), value))
    try:
        base_path = resolve_artifact(base or "default")
        base_artifact = CalibrationArtifact.load(base_path)
    except CalibrationError as error:
        fail(str(error), EXIT_CALIBRATION_ERROR)
    try:
        result = calibrate_from_traffic([s.strip() for s in sources.split(",") if s.strip()], target_fpr=target_fpr,
                                        base=base_artifact, base_source=base or "default", model=model, trim=trim,
                                        metadata=pairs, ca_file=ca_file)
    except TrafficCalibrationError as error:
        fail(str(error), EXIT_USAGE)
    info = result.artifact.data["traffic"]
    if not info["sufficient"]:
        typer.echo(f"WARNING: {result.scores} scores: fewer than 10 expected above the threshold at target FPR "
                   f"{target_fpr:g}; the threshold is mostly noise, collect more traffic", err=True)
    write(result, out)
    implied = result.base_implied_fpr
    typer.echo(f"calibration {result.artifact.id}: threshold {result.artifact.threshold:.6f} at the "
               f"{result.quantile:.4f} quantile of {result.scores} scores of {info['model']} "
               f"({info['first_seen']} .. {info['last_seen']}, {len(info['sources'])} source(s), trim {trim:g})")
    typer.echo(f"  base {result.artifact.data['traffic']['base_calibration']['id']}: threshold "
               f"{base_artifact.threshold:.6f} flags {'n/a' if implied is None else f'{implied:.4f}'} of this "
               f"traffic (its target: {base_artifact.target_fpr})")
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(calibrate_app, name="calibrate")
