"""Calibration jobs on a small CNN (32x32 crops of the bundled photos): artifact, report, resume, shards, refusals.

The real EfficientNet-Lite0 and a real Triton are covered in
``test_calibrate_triton.py``; here the model is ``calibrate_models.target_cnn``
so every scenario (white box, targeted, universal, transfer from a surrogate,
black box with probing) runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from detector import CalibrationArtifact, CalibrationError, Detector
from detector.calibrate import (
    AttackSpec,
    CalibrationJob,
    IncompleteJobError,
    JobConfig,
    JobConfigError,
    run_calibration,
)
from detector.calibrate.access import load_model
from detector.models import bundled_identity

TESTS_DIR = Path(__file__).resolve().parent
ATTACKS = (
    "fgsm:eps=0.0157",
    "pgd_linf:eps=0.0157,alpha=0.0078,steps=3,as=pgd",
    "fgsm:eps=0.0314,targeted=true,as=fgsm_targeted",
    "square:eps=0.05,n_queries=20",
    "universal:eps=0.05,max_iter=1",
    "pgd_linf:eps=0.0314,steps=3,transfer=true,as=transfer",
)


def small_config(**overrides) -> JobConfig:
    values = dict(
        model="calibrate_models:target_cnn", surrogate="calibrate_models:surrogate_cnn", detector="paper",
        image_size=32, crops_per_photo=2, min_confidence=0.0, n_boot=50, chunk_size=4,
        attacks=tuple(AttackSpec.parse(text) for text in ATTACKS), target_fprs=(0.1, 0.05),
    )
    values.update(overrides)
    return JobConfig(**values)


def comparable(artifact: CalibrationArtifact) -> dict:
    """The artifact's document without what differs between two runs by design (time, and id/checksum from it)."""
    document = artifact.to_document()
    return {k: v for k, v in document.items() if k not in ("created_at", "id", "checksum")}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    artifact = run_calibration(small_config(), root / "work", out=root / "cal.json", report=root / "cal.html", progress=False)
    return root, artifact


def test_attack_specs_parse_and_refuse_with_reasons():
    spec = AttackSpec.parse("pgd_linf:eps=0.01,steps=3,as=pgd,targeted=true")
    assert (spec.label, spec.attack, spec.params, spec.targeted) == ("pgd", "pgd_linf", {"eps": 0.01, "steps": 3}, True)
    assert spec.scenario == "white_box" and AttackSpec.parse("square").scenario == "black_box_probing"
    assert AttackSpec.parse("fgsm:transfer=true").scenario == "black_box_transfer"
    for text, message in [
        ("nope", "unknown attack 'nope'"),
        ("fgsm:epsilon=1", r"unknown parameter\(s\) \['epsilon'\]"),
        ("fooling_cppn", "no clean counterpart"),
        ("square:transfer=true", "needs a white-box attack"),
        ("deepfool:targeted=true", "no targeted variant"),
    ]:
        with pytest.raises(JobConfigError, match=message):
            AttackSpec.parse(text)
    with pytest.raises(JobConfigError, match="need gradients of a local model"):
        JobConfig(model="triton", triton_url="h:1", triton_model="m", attacks=(AttackSpec.parse("fgsm"),))
    with pytest.raises(JobConfigError, match="unique"):
        JobConfig(attacks=(AttackSpec.parse("fgsm"), AttackSpec.parse("fgsm")))


def test_artifact_has_threshold_results_and_loads_into_the_detector(single):
    root, artifact = single
    document = json.loads((root / "cal.json").read_text())
    assert document["schema"] == "advsentry.calibration/v1" and document["target_fpr"] == 0.1
    points = document["results"]["operating_points"]
    assert [p["target_fpr"] for p in points] == [0.1, 0.05] and points[0]["threshold"] == document["threshold"]
    assert all(0.0 <= p["held_out_fpr"] <= 1.0 and p["held_out_clean"] == document["data"]["clean_held_out"] for p in points)
    data = document["data"]
    assert data["selected"] == data["clean_fit"] + data["clean_threshold"] + data["clean_held_out"] + data["clean_mixed"] == 20
    # nothing refitted: the threshold is set on the fit and threshold splits together, never on held-out images
    assert all(p["threshold_set_on"] == {"splits": ["fit", "threshold"], "clean": data["clean_fit"] + data["clean_threshold"],
                                         "sources": 5} for p in points)
    assert len(document["data"]["source_files_sha256"]) == 10 and document["data"]["sources_sha256"]
    for key in ("scipy", "torchattacks", "adversarial-robustness-toolbox", "torch"):
        assert key in document["versions"]
    attacks = document["results"]["attacks"]
    assert set(attacks) == {"fgsm", "pgd", "fgsm_targeted", "square", "universal", "transfer"}
    for row in attacks.values():
        assert row["attacked"] == 20 and 0.0 <= row["success_rate"] <= 1.0
        assert row["detection"]["adversarial"] == row["successful"]  # positives are successful attacks only
        assert set(row["detection"]["tpr"]) == {"0.01", "0.05", "0.1"}
    assert attacks["fgsm"]["successful"] > 0 and attacks["fgsm"]["linf_255_median"] <= 4.0 + 1e-6
    assert attacks["square"]["queries_total"] > 0 and attacks["square"]["scenario"] == "black_box_probing"
    assert attacks["transfer"]["surrogate_success_rate"] is not None and "transfer_success_rate" in attacks["transfer"]
    assert attacks["universal"]["universal_fitted_on"] > 0 and attacks["fgsm_targeted"]["targeted"] is True

    model, identity = load_model("calibrate_models:target_cnn")
    assert document["model"] == identity.to_dict()
    detector = Detector.from_artifact(root / "cal.json", model=model, model_identity=identity)
    assert detector.threshold == artifact.threshold and detector.calibration_id == artifact.id


def test_report_is_self_contained_html_with_figures_and_table(single):
    root, artifact = single
    text = (root / "cal.html").read_text()
    for section in ("Operating points", "Per attack", "ROC curves", "Score distributions", "Examples", "Settings used"):
        assert section in text
    assert text.count("data:image/png;base64,") == 3 and "http://" not in text and "https://" not in text
    assert artifact.id in text and "fgsm_targeted" in text


def test_tampered_or_mismatched_artifact_is_refused_with_what_differs(single, tmp_path):
    root, _ = single
    document = json.loads((root / "cal.json").read_text())
    document["threshold"] += 1.0
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(document))
    with pytest.raises(CalibrationError, match="checksum mismatch"):
        CalibrationArtifact.load(tampered)
    with pytest.raises(CalibrationError, match="model: artifact was fitted on 'calibrate_models:target_cnn'"):
        Detector(model_identity=bundled_identity()).load_calibration(root / "cal.json")

    from service.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["calibrate", "verify", str(tampered)])
    assert refused.exit_code == 4 and "checksum mismatch" in refused.output
    other = runner.invoke(app, ["calibrate", "verify", str(root / "cal.json"), "--model", "calibrate_models:surrogate_cnn"])
    assert other.exit_code == 4 and "model weights: artifact sha256" in other.output
    ok = runner.invoke(app, ["calibrate", "verify", str(root / "cal.json"), "--model", "calibrate_models:target_cnn"])
    assert ok.exit_code == 0 and "held-out FPR" in ok.output


def test_shards_merge_into_exactly_the_single_run(single, tmp_path):
    _, whole = single
    from service.cli import app

    runner = CliRunner()
    common = ["--model", "calibrate_models:target_cnn", "--surrogate", "calibrate_models:surrogate_cnn", "--detector", "paper",
              "--image-size", "32", "--min-confidence", "0", "--n-boot", "50", "--chunk-size", "4",
              "--target-fpr", "0.1", "--target-fpr", "0.05", "--no-progress"]
    for text in ATTACKS:
        common += ["--attack", text]
    for index in range(2):
        result = runner.invoke(app, ["calibrate", "run", "--shard", f"{index}/2", "--work-dir", str(tmp_path / f"s{index}"), *common])
        assert result.exit_code == 0, result.output
    incomplete = runner.invoke(app, ["calibrate", "merge", str(tmp_path / "s0"), "--out", str(tmp_path / "x.json")])
    assert incomplete.exit_code == 1 and "work unit(s) missing" in incomplete.output
    merged = runner.invoke(app, ["calibrate", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                                 "--out", str(tmp_path / "merged.json"), "--report", str(tmp_path / "merged.html")])
    assert merged.exit_code == 0, merged.output
    assert comparable(CalibrationArtifact.load(tmp_path / "merged.json")) == comparable(whole)
    assert (tmp_path / "merged.html").is_file()


def test_interrupted_run_resumes_without_redoing_finished_units(single, tmp_path):
    _, whole = single
    config = small_config()
    done: list[str] = []

    def crash(name: str) -> None:
        done.append(name)
        if len(done) == 7:
            raise KeyboardInterrupt  # as if the job were killed after its 7th unit

    with pytest.raises(KeyboardInterrupt):
        CalibrationJob(config, tmp_path / "work", progress=False).run(after_unit=crash)
    job = CalibrationJob(config, tmp_path / "work", progress=False)
    stats = job.run(after_unit=lambda name: done.append(name))
    assert stats.reused == 7 and len(set(done)) == len(done) == stats.units  # nothing computed twice
    with pytest.raises(IncompleteJobError, match="missing"):
        CalibrationJob(small_config(seed=1), tmp_path / "work", progress=False).finalize()
    artifact, _, _ = job.finalize()
    assert comparable(artifact) == comparable(whole)


def test_refit_combiner_and_user_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    config = small_config(images=(str(tmp_path),), attacks=(AttackSpec.parse("fgsm:eps=0.0314"),), refit_combiner=True,
                          holdout=0.5, target_fprs=(0.25,))
    artifact = run_calibration(config, tmp_path / "work", out=tmp_path / "cal.json", progress=False)
    assert artifact.combiner.kind == "logistic" and artifact.data["candidates"] == 8
    assert artifact.results["attacks"]["fgsm"]["evaluated_positives"] == "held-out images"
    assert set(artifact.data["source_files_sha256"]) == {f"{tmp_path.name}/img{i}.png" for i in range(8)}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace/load: TorchScript itself is deprecated
def test_torchscript_model_is_identified_by_file_hash_and_needs_triton_for_maps(tmp_path):
    import torch

    from calibrate_models import target_cnn
    from detector.models import file_sha256

    path = tmp_path / "model.pt"
    torch.jit.trace(target_cnn(), torch.rand(1, 3, 32, 32)).save(str(path))
    model, identity = load_model(str(path))
    assert identity.name == "model" and identity.weights_sha256 == file_sha256(str(path.resolve()))
    with pytest.raises(JobConfigError, match="--score-via-triton"):
        CalibrationJob(small_config(model=str(path), attacks=(AttackSpec.parse("fgsm"),)), tmp_path / "w").runtime()


def test_a_killed_process_resumes_and_keeps_its_finished_units(tmp_path):
    """SIGKILL the CLI mid-job: units written before the kill are reused as they are (same files, not rewritten)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = TESTS_DIR.parent
    work = tmp_path / "work"
    command = [sys.executable, "-c", "from service.cli import app; app()", "calibrate", "run", "--out", str(tmp_path / "cal.json"),
               "--work-dir", str(work), "--model", "calibrate_models:target_cnn", "--detector", "paper", "--image-size", "32",
               "--min-confidence", "0", "--chunk-size", "2", "--n-boot", "20", "--no-progress",
               "--attack", "fgsm:eps=0.0314", "--attack", "one_pixel:popsize=30,max_iter=3"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(TESTS_DIR)]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(list(work.glob("units/*.pt"))) < 12:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {path.name: path.stat().st_mtime_ns for path in work.glob("units/*.pt")}
    assert before, "no unit finished before the kill"
    resumed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    after = {path.name: path.stat().st_mtime_ns for path in work.glob("units/*.pt")}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished work was not redone
    assert len(after) == 10 + 2 * 10  # 10 clean chunks + 2 attacks x 10 chunks
    assert CalibrationArtifact.load(tmp_path / "cal.json").results["attacks"]["one_pixel"]["queries_total"] > 0


def test_a_model_that_breaks_the_pixel_contract_is_a_config_error_not_a_traceback(tmp_path):
    """issue 21: an NHWC model failed deep inside the clean stage; now the job refuses it up front (exit 2)."""
    with pytest.raises(JobConfigError, match=r"own_models:nhwc_classifier.*does not follow the model contract.*NCHW"):
        CalibrationJob(small_config(model="own_models:nhwc_classifier", attacks=(AttackSpec.parse("fgsm"),)),
                       tmp_path / "w").runtime()
