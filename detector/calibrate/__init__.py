"""Threshold calibration jobs: adversarials against *your* model and images, the artifact the sidecar loads.

Pipeline (see each module):

- :mod:`.spec`: the job's settings and attack specs;
- :mod:`.data`: clean candidates, source hashes, the split by source;
- :mod:`.access`, :mod:`.triton_query`: the model locally or through a Triton
  endpoint (counted queries for black box with probing), production scoring;
- :mod:`.stages`: one chunk's clean scores, one chunk's attack;
- :mod:`.store`, :mod:`.job`: resumable, shardable units in a work directory;
- :mod:`.fit`: combiner, thresholds, held-out FPR, per-attack results;
- :mod:`.report`: the self-contained HTML report.

Typical use::

    from detector.calibrate import JobConfig, AttackSpec, run_calibration
    config = JobConfig(attacks=tuple(AttackSpec.parse(a) for a in DEFAULT_ATTACKS))
    artifact = run_calibration(config, "work/", out="cal.json", report="cal.html")
"""

from __future__ import annotations

from pathlib import Path

from detector.calibration import CalibrationArtifact

from .job import CalibrationJob, IncompleteJobError, RunStats, merge_job
from .spec import DEFAULT_ATTACKS, AttackSpec, JobConfig, JobConfigError
from .store import WorkDirError


def _write(job: CalibrationJob, out: str | Path, report: str | Path | None) -> CalibrationArtifact:
    from .report import write_report

    artifact, result, banks = job.finalize()
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
) -> CalibrationArtifact | RunStats:
    """Run (or resume) a job; a whole job writes artifact + report, a shard returns its :class:`RunStats`."""
    job = CalibrationJob(config, work_dir, device=device, progress=progress)
    stats = job.run(shard)
    if shard[1] > 1 or out is None:
        return stats
    return _write(job, out, report)


def merge_calibration(dirs: list[str | Path], *, out: str | Path, report: str | Path | None = None) -> CalibrationArtifact:
    """Merge shard work directories into the artifact (and report) a single run gives."""
    return _write(merge_job(dirs), out, report)


__all__ = [
    "DEFAULT_ATTACKS",
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
