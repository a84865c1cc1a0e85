"""Command line: ``python -m benchmarks.corpus build [--out DIR] [--smoke] [--force] ...``.

Exit codes: 0 built or reused, 2 usage error or the Debian packages are missing
(the message names the ``apt-get install`` line), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.corpus.build import SUMMARY_DIR, MissingPackages, Settings, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="extract, classify and write the corpus")
    b.add_argument("--out", type=Path, default=None, help="output directory (default: $ADVSENTRY_CORPUS_DIR or ~/.cache/advsentry/corpus)")
    b.add_argument("--smoke", action="store_true", help="a tiny corpus (~12 candidates) in a temp dir unless --out is given")
    b.add_argument("--force", action="store_true", help="rebuild even when the output matches settings and package versions")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--min-confidence", type=float, default=0.3, help="keep candidates whose top-1 probability is at least this (0.5 yields ~680 inputs from ~310 sources; 0.3 reaches the 1000/400 target)")
    b.add_argument("--crops-per-photo", type=int, default=4)
    b.add_argument("--composites-per-object", type=int, default=3)
    b.add_argument("--max-per-source", type=int, default=4)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument(
        "--summary-dir", type=Path, default=None,
        help=f"where summary.md/json go (default {SUMMARY_DIR} for full builds, none for --smoke)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_confidence <= 1.0:
        parser.error("--min-confidence must be in [0, 1]")
    for name in ("crops_per_photo", "composites_per_object", "max_per_source", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    settings = Settings(
        seed=args.seed,
        min_confidence=args.min_confidence,
        crops_per_photo=args.crops_per_photo,
        composites_per_object=args.composites_per_object,
        max_per_source=args.max_per_source,
        batch_size=args.batch_size,
        smoke=args.smoke,
    )
    out = args.out
    if out is None and args.smoke:
        out = Path(tempfile.mkdtemp(prefix="advsentry-corpus-smoke-"))
    summary_dir = args.summary_dir if args.summary_dir is not None else (None if args.smoke else SUMMARY_DIR)
    try:
        build(out, settings, force=args.force, summary_dir=summary_dir)
    except MissingPackages as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
