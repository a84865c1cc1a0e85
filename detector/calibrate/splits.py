"""Splitting inputs by the *originals* they were made from into named roles (fit / threshold / held-out ...).

Why originals and not inputs or sources: inputs made from one original file
(crops of one photo, composites pasted on one background) are near-duplicates
of each other. If a fitted detector (a combiner, a learned signal) saw some
of them, the others look familiar to it, so a threshold or an FPR measured on
them is optimistic. Holding out *sources* is not enough where an input is made
from several originals: a corpus composite's source is its cut-out, but its
background is shared with other composites and with the background's own
crops, and holding out sources alone let the threshold's inputs share
backgrounds with fitted ones (the corpus study measured 16.7 % realized FPR at
a 5 % target that way, against 4.3 % with this split; see
``benchmarks/corpus_study/README.md``, "Threshold, dev only").

:func:`assign_roles` is the one implementation, used by the corpus study
(two roles: ``"held"`` for the threshold, the rest ``"fit"``) and by
``advsentry calibrate`` (three: ``"holdout"`` where the FPR is measured,
``"threshold"`` where the threshold is set, the rest ``"fit"`` for what is
refitted). A seeded permutation of the distinct originals is cut into
consecutive slices, one per named role, in the order given; an input takes
the role of its originals when they all have the same one, and is *mixed*
(used for nothing, counted) when they do not. So no original is ever on two
sides, whatever the number of roles.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

#: The calibration job's roles (:mod:`detector.calibrate.data`).
FIT = "fit"
THRESHOLD = "threshold"
HOLDOUT = "holdout"
MIXED = "out"
JOB_ROLES = (FIT, THRESHOLD, HOLDOUT)


def role_counts(distinct: int, shares: Mapping[str, float]) -> dict[str, int]:
    """How many of ``distinct`` originals each named role gets: ``max(1, round(share * distinct))``, 0 for a share <= 0.

    At least one as soon as the share is positive, so that a small job still
    has something in every role it asked for; roles are served in order, so
    when the counts add up to more than ``distinct`` the last ones get less
    (:func:`assign_roles` cuts the permutation in that order).
    """
    counts: dict[str, int] = {}
    left = distinct
    for role, share in shares.items():
        count = 0 if share <= 0 else max(1, round(share * distinct))
        counts[role] = min(count, left)
        left -= counts[role]
    return counts


def assign_roles(
    originals: Sequence[Collection[str]],
    shares: Mapping[str, float],
    seed: int | Sequence[int],
    *,
    rest: str = FIT,
    mixed: str = MIXED,
) -> np.ndarray:
    """Each row's role, from the originals (ids, e.g. SHA-256s) each row was made from.

    ``shares`` maps role names to the share of the distinct originals they
    get (see :func:`role_counts`; they must add up to at most 1); the
    originals left over get ``rest``. The distinct originals are sorted and
    permuted by ``np.random.default_rng(seed)``, so the roles depend only on
    the set of originals and the seed (not on the rows' order), and every
    process of a sharded job computes the same ones. A row whose originals
    all have one role gets it; a row whose originals have several gets
    ``mixed``: it shares an original with each side, so it may serve none.

    With one role ``{"held": share}`` and ``rest="fit"``, ``mixed="out"`` this
    is exactly the corpus study's threshold protocol (its committed results
    were made with it; the test suite pins the equality). Returns a numpy
    array of role names, one per row.
    """
    if any(not row for row in originals):
        raise ValueError("every row needs at least one original to be given a role")
    if sum(max(0.0, s) for s in shares.values()) > 1.0 + 1e-9:
        raise ValueError(f"role shares add up to more than 1: {dict(shares)}")
    if not any(s > 0 for s in shares.values()):
        return np.full(len(originals), rest)
    distinct = sorted(set().union(*map(set, originals)))
    order = np.random.default_rng(seed).permutation(distinct).tolist()
    role_of: dict[str, str] = {}
    start = 0
    for role, count in role_counts(len(distinct), shares).items():
        role_of.update((o, role) for o in order[start : start + count])
        start += count
    role_of.update((o, rest) for o in order[start:])
    rows = []
    for row in originals:
        found = {role_of[o] for o in row}
        rows.append(found.pop() if len(found) == 1 else mixed)
    return np.array(rows)
