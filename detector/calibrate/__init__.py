"""Threshold calibration jobs: adversarials against *your* model and images, the artifact the sidecar loads.

Pipeline (see each module):

- :mod:`.spec`: the job's settings and attack specs;
- :mod:`.data`, :mod:`.splits`: clean candidates, source hashes, the split by originals into
  fit / threshold / held-out (shared with the corpus study);
- :mod:`.access`, :mod:`.triton_query`: the model locally or through a Triton
  endpoint (counted queries for black box with probing), production scoring;
- :mod:`.stages`: one chunk's clean scores, one chunk's attack;
- :mod:`.store`, :mod:`.job`: resumable, shardable units in a work directory;
- :mod:`.fit`: combiner (fit split), thresholds (threshold split), realized FPR and
  per-attack results (held-out split);
- :mod:`.intervals`: exact binomial intervals for rates, AUC bootstrap by source;
- :mod:`.sufficiency`: minimum sample sizes, ``--min-samples strict|warn|off``;
- :mod:`.report`: the self-contained HTML report.

Typical use::

    from detector.calibrate import JobConfig, AttackSpec, run_calibration
    config = JobConfig(attacks=tuple(AttackSpec.parse(a) for a in DEFAULT_ATTACKS))
    artifact = run_calibration(config, "work/", out="cal.json", report="cal.html")
"""

from __future__ import annotations

import sys
from pathlib import Path

from detector.calibration import CalibrationArtifact

from .data import upscaling_warning
from .job import CalibrationJob, IncompleteJobError, RunStats, merge_job
from .spec import DEFAULT_ATTACKS, DEFAULT_CORPUS_IMAGES, AttackSpec, JobConfig, JobConfigError
from .store import WorkDirError
from .sufficiency import POLICIES, InsufficientSamplesError, SampleSize, banner, enforce, required_sizes


def _write(job: CalibrationJob, out: str | Path, report: str | Path | None, min_samples: str = "warn") -> CalibrationArtifact:
    from .report import write_report

    artifact, result, banks = job.finalize()
    assert job.sample_size is not None
    enforce(job.sample_size, min_samples)  # strict: refuse before anything is written; warn: the end-of-job banner
    artifact.save(out)
    saved = CalibrationArtifact.load(out)  # the written file round-trips (id, checksum)
    if report is not None:
        write_report(report, saved, result, banks)
    return saved


def run_calibration(
    config: JobConfig,
    work_dir: str | Path,
    *,
    out: str | Path | None = None,
    report: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    progress: bool = True,
    min_samples: str = "warn",
) -> CalibrationArtifact | RunStats:
    """Run (or resume) a job; a whole job writes artifact + report, a shard returns its :class:`RunStats`.

    ``min_samples`` (``strict`` | ``warn`` | ``off``, see :mod:`.sufficiency`)
    is checked on the candidates before any work (so ``strict`` fails fast)
    and on the images actually used at the end (``strict`` then writes
    nothing). It is a policy, not part of the job: it changes no result.
    """
    job = CalibrationJob(config, work_dir, device=device, progress=progress)
    enforce(job.candidate_sample_size(), min_samples)
    upscaled = upscaling_warning(job.plan.description)
    if upscaled and min_samples != "off":
        sys.stderr.write(banner(upscaled))
    stats = job.run(shard)
    if shard[1] > 1 or out is None:
        return stats
    return _write(job, out, report, min_samples)


def merge_calibration(
    dirs: list[str | Path], *, out: str | Path, report: str | Path | None = None, min_samples: str = "warn"
) -> CalibrationArtifact:
    """Merge shard work directories into the artifact (and report) a single run gives."""
    return _write(merge_job(dirs), out, report, min_samples)


__all__ = [
    "DEFAULT_ATTACKS",
    "DEFAULT_CORPUS_IMAGES",
    "POLICIES",
    "InsufficientSamplesError",
    "SampleSize",
    "enforce",
    "required_sizes",
    "AttackSpec",
    "CalibrationJob",
    "IncompleteJobError",
    "JobConfig",
    "JobConfigError",
    "RunStats",
    "WorkDirError",
    "merge_calibration",
    "merge_job",
    "run_calibration",
]
