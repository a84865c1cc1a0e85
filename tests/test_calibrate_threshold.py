"""Where ``advsentry calibrate`` sets its threshold: on rows no fit saw (issue 20, item 4).

A combiner fitted on noise makes its own training rows look cleaner than
unseen ones, so a threshold set on them (the old protocol) is too low and the
realized FPR exceeds the target. The job now splits the clean images by their
originals into fit / threshold / held-out splits (:mod:`detector.calibrate.splits`,
shared with the corpus study), fits on the first, sets the threshold on the
second and measures the realized FPR on the third. Everything here runs on
synthetic numbers (no model), in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector.calibrate import JobConfig
from detector.calibrate.data import plan_clean_images
from detector.calibrate.fit import AttackBank, calibrate
from detector.calibrate.spec import AttackSpec
from detector.calibrate.splits import FIT, HOLDOUT, MIXED, THRESHOLD, assign_roles
from detector.combiner import LogisticCombiner
from detector.evaluation import threshold_at_fpr

TARGET = 0.05
SIGNALS = 12  # noise-only signals; the refitted combiner is quadratic (2 x 12 weights to overfit with)
SOURCES, CROPS = 400, 2  # 800 clean rows; default shares: 400 held-out, 200 threshold, 200 fit
SEEDS = range(20)


def _noise_job(seed: int, config: JobConfig) -> tuple[float, float, float]:
    """One calibration on noise: (realized FPR of the shipped threshold, of the old fit-rows threshold, reported held-out FPR).

    Realized FPR: the share of 20 000 fresh noise rows (clean images never
    seen by anything) above the threshold, scored by the shipped combiner.
    """
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(SOURCES), CROPS)  # each source (photo) is the one original of its crops
    roles = assign_roles([frozenset([f"photo{g}"]) for g in groups], {HOLDOUT: config.holdout, THRESHOLD: config.threshold_split},
                         config.seed + seed, rest=FIT, mixed=MIXED)
    n = len(groups)
    clean = rng.normal(size=(n, SIGNALS))
    adversarial = rng.normal(size=(n, SIGNALS))  # same distribution: the signals know nothing about attacks
    bank = AttackBank(AttackSpec("noise", "fgsm"), indices=np.arange(n), success=np.ones(n, bool), linf=np.zeros(n),
                      l2=np.zeros(n), l0=np.zeros(n), queries=None, surrogate_success=None, entropies=adversarial)
    start = LogisticCombiner((0.0,) * SIGNALS, 0.0, (0.0,) * SIGNALS, (1.0,) * SIGNALS, (0.0,) * SIGNALS)
    result = calibrate(config, start, clean, roles, {"noise": bank}, roles, clean_groups=groups, group_of=groups)
    point = result.operating_points[0]
    assert point["threshold_set_on"]["splits"] == [THRESHOLD] and point["threshold_set_on"]["clean"] == result.counts["clean_threshold"]
    assert result.threshold == threshold_at_fpr(result.scores["clean_threshold"], TARGET)
    fresh = result.combiner.combine_array(rng.normal(size=(20_000, SIGNALS)))
    old_threshold = threshold_at_fpr(result.scores["clean_fit"], TARGET)  # what calibrate did before: the fit rows' quantile
    return float(np.mean(fresh > result.threshold)), float(np.mean(fresh > old_threshold)), float(point["held_out_fpr"])


def test_noise_signals_realize_the_target_fpr_when_the_threshold_is_set_on_unfitted_rows():
    config = JobConfig(refit_combiner=True, target_fprs=(TARGET,), n_boot=10)  # default shares: 0.5 held out, 0.25 threshold
    runs = np.array([_noise_job(seed, config) for seed in SEEDS])
    realized, old, reported = runs.mean(axis=0)
    print(f"noise signals, target {TARGET:.1%}: realized FPR {realized:.2%} (threshold split), {old:.2%} (old: fit rows); "
          f"reported held-out {reported:.2%}")
    assert abs(realized - TARGET) <= 0.02, f"threshold split: realized FPR {realized:.3%} at target {TARGET:.0%}"
    assert abs(reported - TARGET) <= 0.02, f"the printed held-out FPR {reported:.3%} should measure it"
    assert old > 0.08, f"the old protocol (threshold on the fit rows) should overshoot, got {old:.3%}"


def _old_dev_roles(originals: list[frozenset[str]], share: float, seed: int) -> np.ndarray:
    """The corpus study's ``dev_roles`` as committed before it called ``assign_roles`` (the reference)."""
    if share <= 0:
        return np.full(len(originals), "fit")
    distinct = sorted(set().union(*originals))
    held = set(np.random.default_rng(seed).permutation(distinct)[: max(1, round(share * len(distinct)))].tolist())
    return np.array(["held" if o <= held else "out" if o & held else "fit" for o in originals])


def _random_originals(rng: np.random.Generator) -> list[frozenset[str]]:
    """Crops (one original) and composites (a cut-out on a shared background), in random order, with hex-like names."""
    photos = [f"{rng.integers(2**62):016x}" for _ in range(int(rng.integers(1, 60)))]
    cutouts = [f"{rng.integers(2**62):016x}" for _ in range(int(rng.integers(1, 30)))]
    backgrounds = [f"{rng.integers(2**62):016x}" for _ in range(int(rng.integers(1, 12)))]
    rows = [frozenset([p]) for p in photos for _ in range(int(rng.integers(1, 4)))]
    rows += [frozenset([c, str(rng.choice(backgrounds))]) for c in cutouts for _ in range(int(rng.integers(1, 3)))]
    rows += [frozenset([str(rng.choice(backgrounds))]) for _ in range(int(rng.integers(0, 10)))]  # a background's own crops
    return [rows[i] for i in rng.permutation(len(rows))]


def test_corpus_study_dev_roles_is_exactly_the_old_algorithm():
    from benchmarks.corpus_study.run import dev_roles

    rng = np.random.default_rng(20)
    for case in range(40):
        originals = _random_originals(rng)
        share, seed = float(rng.choice([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])), int(rng.integers(0, 1000))
        assert dev_roles(originals, share, seed).tolist() == _old_dev_roles(originals, share, seed).tolist(), case
    # and on the installed corpus's dev part, the inputs the committed results were made from (when there is one)
    root = Path.home() / ".cache" / "advsentry" / "corpus"
    if (root / "manifest.json").is_file():
        from benchmarks.corpus_study.run import originals_by_id

        found = originals_by_id([root])
        dev = [found[image["id"]] for image in json.loads((root / "manifest.json").read_text())["images"] if image["split"] == "dev"]
        for seed in (0, 1, 7):
            assert dev_roles(dev, 0.25, seed).tolist() == _old_dev_roles(dev, 0.25, seed).tolist()


def test_assign_roles_never_puts_one_original_in_two_roles():
    rng = np.random.default_rng(4)
    shares = {HOLDOUT: 0.5, THRESHOLD: 0.25}
    for _ in range(30):
        originals = _random_originals(rng)
        roles = assign_roles(originals, shares, seed=int(rng.integers(1000)))
        where: dict[str, set[str]] = {}
        for row, role in zip(originals, roles):
            if role != MIXED:
                for original in row:
                    where.setdefault(original, set()).add(str(role))
        assert all(len(found) == 1 for found in where.values())  # used in one split only
        for row, role in zip(originals, roles):  # a mixed row does mix: its originals sit in several splits
            if role == MIXED:
                assert len(row) > 1
        # the roles depend on the rows' originals and the seed, not on the rows' order
        order = rng.permutation(len(originals))
        again = assign_roles([originals[i] for i in order], shares, seed=3)
        first = assign_roles(originals, shares, seed=3)
        assert again.tolist() == [first[i] for i in order]
    with pytest.raises(ValueError, match="at least one original"):
        assign_roles([frozenset()], shares, seed=0)


def test_a_user_image_folder_splits_by_file_content_into_disjoint_fit_threshold_and_holdout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"img{i:02d}.png")
    for i in range(4):  # byte-identical copies under other names: one original, so one split
        (tmp_path / f"copy{i}.png").write_bytes((tmp_path / f"img{i:02d}.png").read_bytes())
    plan = plan_clean_images(JobConfig(images=(str(tmp_path),), image_size=16, seed=5))
    members = {role: [c for c, r in zip(plan.candidates, plan.roles) if r == role] for role in (FIT, THRESHOLD, HOLDOUT, MIXED)}
    assert all(members[role] for role in (FIT, THRESHOLD, HOLDOUT)) and not members[MIXED]
    originals = {role: set().union(*(c.split_by for c in found)) for role, found in members.items() if found}
    assert not originals[FIT] & originals[THRESHOLD] and not originals[FIT] & originals[HOLDOUT]
    assert not originals[THRESHOLD] & originals[HOLDOUT]
    role_of = dict(zip((c.name for c in plan.candidates), plan.roles))
    for i in range(4):
        copy = next(name for name in role_of if name.endswith(f"copy{i}.png"))
        image = next(name for name in role_of if name.endswith(f"img{i:02d}.png"))
        assert role_of[copy] == role_of[image]
    # 24 originals at the default shares: 12 held out, 6 threshold, 6 fit
    assert [len(originals[r]) for r in (HOLDOUT, THRESHOLD, FIT)] == [12, 6, 6]
    counts = plan.description["split_candidates"]
    assert sum(counts[r]["candidates"] for r in (FIT, THRESHOLD, HOLDOUT)) == 28


def test_artifacts_record_directories_without_this_machines_absolute_path(tmp_path, monkeypatch):
    """The corpus root is written relative to the working directory or ~/, never as an absolute path."""
    from pathlib import Path

    from detector.calibrate.data import portable_path

    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "corpus") == "corpus"
    assert portable_path(Path.home() / ".cache" / "advsentry" / "corpus").startswith("~/")


def test_an_attack_marked_fit_false_is_evaluated_but_never_fitted_on():
    """``fit=false`` (an attack the detector was not trained against): its adversarials stay out of the combiner fit."""
    config = JobConfig(refit_combiner=True, target_fprs=(TARGET,), n_boot=10)
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), 2)
    roles = assign_roles([frozenset([f"photo{g}"]) for g in groups], {HOLDOUT: config.holdout, THRESHOLD: config.threshold_split},
                         config.seed, rest=FIT, mixed=MIXED)
    n = len(groups)
    clean = rng.normal(size=(n, 2))
    seen = rng.normal(size=(n, 2)) + np.array([3.0, 0.0])  # separable on signal 0
    unseen = rng.normal(size=(n, 2)) + np.array([0.0, 3.0])  # separable on signal 1 only

    def bank(label: str, values: np.ndarray, fit: bool) -> AttackBank:
        return AttackBank(AttackSpec(label, "fgsm", fit=fit), indices=np.arange(n), success=np.ones(n, bool),
                          linf=np.zeros(n), l2=np.zeros(n), l0=np.zeros(n), queries=None, surrogate_success=None,
                          entropies=values)

    start = LogisticCombiner((0.0, 0.0), 0.0, (0.0, 0.0), (1.0, 1.0))
    pooled = calibrate(config, start, clean, roles, {"a": bank("a", seen, True), "b": bank("b", unseen, True)}, roles,
                       clean_groups=groups, group_of=groups)
    apart = calibrate(config, start, clean, roles, {"a": bank("a", seen, True), "b": bank("b", unseen, False)}, roles,
                      clean_groups=groups, group_of=groups)
    assert apart.per_attack["a"]["combiner"] == "seen" and apart.per_attack["b"]["combiner"] == "unseen"
    # fitted on "a" alone, the combiner leans on signal 0 and meets "b" near chance; pooled, it learned both
    assert apart.per_attack["b"]["detection"]["auc"]["value"] < 0.7 < pooled.per_attack["b"]["detection"]["auc"]["value"]
    assert AttackSpec.parse("deepfool:fit=false,limit=10").fit is False and AttackSpec.parse("deepfool").fit is True
    with pytest.raises(ValueError, match="fit must be true or false"):
        AttackSpec.parse("deepfool:fit=maybe")
    assert "fit" not in AttackSpec.parse("deepfool:fit=false").unit_dict()  # the same attack's units are shared
