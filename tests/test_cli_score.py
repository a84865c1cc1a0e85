"""``advsentry score`` end to end: the real console script on real photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from detector import DEFAULT_COMBINER, DEFAULT_FEATURES, CalibrationArtifact
from detector.models import bundled_identity
from detector.samples import load_photo


def _advsentry() -> list[str]:
    script = Path(sys.executable).with_name("advsentry")
    return [str(script)] if script.exists() else [shutil.which("advsentry") or "advsentry"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_advsentry() + list(args), capture_output=True, text=True, timeout=300, env=dict(os.environ))


@pytest.mark.slow
def test_score_json_with_calibration_and_maps(tmp_path):
    Image.fromarray(load_photo("coffee")).save(tmp_path / "coffee.png")
    Image.fromarray(load_photo("chelsea")).save(tmp_path / "cat.jpg")
    CalibrationArtifact.create(2.0, DEFAULT_FEATURES, bundled_identity(), combiner=DEFAULT_COMBINER).save(tmp_path / "cal.json")
    result = _run("score", "--json", "--calibration", str(tmp_path / "cal.json"), "--save-maps", str(tmp_path / "maps"),
                  str(tmp_path / "coffee.png"), str(tmp_path / "cat.jpg"))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(tmp_path / "coffee.png"), str(tmp_path / "cat.jpg")]
    assert records[0]["label"] == "espresso" and records[0]["probability"] > 0.5
    assert "cat" in records[1]["label"]
    for record in records:
        assert record["adversarial"] == (record["score"] > 2.0)
        assert record["calibration"].startswith("cal-")
        figure = Image.open(record["maps"])
        assert figure.size[0] > figure.size[1] > 100
        # each signal's value and share: the shares and the combiner's bias add up to the score
        assert list(record["signals"]) == list(DEFAULT_FEATURES)
        assert sum(record["contributions"].values()) + DEFAULT_COMBINER.bias == pytest.approx(record["score"], abs=1e-4)


def test_missing_unreadable_and_wrong_mode_files_exit_3(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    Image.new("I;16", (8, 8)).save(tmp_path / "deep.png")
    for path, message in (
        (tmp_path / "missing.png", "no such file"),
        (tmp_path / "notes.png", "not a readable image"),
        (tmp_path / "deep.png", "unsupported image mode"),
    ):
        result = _run("score", str(path))
        assert result.returncode == 3, result.stderr
        assert message in result.stderr


def test_bad_calibration_exits_4_and_no_input_exits_2(tmp_path):
    Image.fromarray(load_photo("coffee")).save(tmp_path / "coffee.png")
    (tmp_path / "cal.json").write_text("{}")
    result = _run("score", "--calibration", str(tmp_path / "cal.json"), str(tmp_path / "coffee.png"))
    assert result.returncode == 4 and "schema" in result.stderr
    result = _run("score")
    assert result.returncode == 2 and "--bundled" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper", "fixed-signals"])
def test_score_takes_a_shipped_detectors_name_like_serve(tmp_path, name):
    """issue 20 item 5: ``--calibration paper`` was "no such file"; one resolver serves every command."""
    Image.fromarray(load_photo("coffee")).save(tmp_path / "coffee.png")
    result = _run("score", "--json", "--calibration", name, str(tmp_path / "coffee.png"))
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    if name == "paper":  # the seed's single-map detector: a score, no threshold, so no verdict
        assert record["adversarial"] is None and record["threshold"] is None and record["calibration"] is None
        assert list(record["signals"]) == ["feature_response"]
    else:
        assert record["calibration"].startswith("cal-") and record["adversarial"] == (record["score"] > record["threshold"])
    bad = _run("score", "--calibration", "no-such-detector", str(tmp_path / "coffee.png"))
    assert bad.returncode == 4 and "default" in bad.stderr and "paper" in bad.stderr, bad.stderr
