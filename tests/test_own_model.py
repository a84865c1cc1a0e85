"""A user's own model, end to end (issue 21): factory → calibrate → export-model --calibration → serve → verdicts.

The model is EfficientNet-Lite2's architecture at 260 px with a 10-class head
behind a wrapper whose attribute is ``model`` (``tests/own_models.py``): other
layer names, channel counts, input size and class count than the bundled
Lite0. The shipped default detector is refitted for it (its layers chosen by
role, :mod:`detector.layers`), at a smoke budget; a real Triton serves the
exported model and a real sidecar scores it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from e2e_triton import RunningSidecar, make_settings, outputs

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
FACTORY = "own_models:lite2_ten_classes"
SIZE = 260


def _advsentry(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("advsentry")
    command = [str(script)] if script.exists() else [shutil.which("advsentry") or "advsentry"]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """60 crops of the bundled photos at 260 px, as a user's image folder."""
    from PIL import Image

    from detector.samples import random_crops

    folder = tmp_path_factory.mktemp("images")
    for sample in random_crops(6, seed=1, size=SIZE, min_fraction=0.3):
        Image.fromarray(sample.pixels()).save(folder / f"{sample.name.replace('/', '_')}.png")
    return folder


@pytest.fixture(scope="module")
def calibration(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cal") / "cal.json"
    result = _advsentry("calibrate", "run", "--model", FACTORY, "--detector", "default", "--refit-signals",
                        "--images", str(images), "--image-size", str(SIZE), "--attack", "fgsm:eps=0.0313",
                        "--holdout", "0.3", "--threshold-split", "0.2", "--n-boot", "50", "--no-progress",
                        "--out", str(out), "--work-dir", str(out.parent / "work"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "realized held-out FPR" in result.stdout + result.stderr
    return out


def _fgsm(pixels: np.ndarray, eps: float = 8 / 255) -> np.ndarray:
    import torch

    sys.path.insert(0, str(TESTS))
    from own_models import lite2_ten_classes

    x = torch.from_numpy(pixels).requires_grad_(True)
    logits = lite2_ten_classes()(x)
    torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
    return (((x + eps * x.grad.sign()).clamp(0, 1) * 255).round() / 255).detach().numpy().astype(np.float32)


def test_the_default_detector_is_refitted_on_the_users_layers_by_role(calibration):
    document = json.loads(calibration.read_text())
    assert document["model"]["name"] == FACTORY
    head, lid = document["features"]["head_block10"], document["features"]["lid_block4"]
    # the bundled model's net._blocks.10 (1/16) and net._blocks.4 (1/8) are this model's blocks at those strides
    assert (head["layer"], head["channels"]) == ("model._blocks.14", 120) and head["parameters"]
    assert lid["layer"] == "model._blocks.6" and lid["reference"]
    assert document["results"]["operating_points"][0]["held_out_clean"] > 0


def test_without_refit_signals_a_clear_error_says_what_to_do(images, tmp_path):
    result = _advsentry("calibrate", "run", "--model", FACTORY, "--detector", "default", "--images", str(images),
                        "--image-size", str(SIZE), "--attack", "fgsm", "--out", str(tmp_path / "c.json"),
                        "--work-dir", str(tmp_path / "w"), "--no-progress", timeout=300)
    assert result.returncode == 2, result.stderr
    assert "--refit-signals" in result.stderr and "model._blocks.14" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_serve_and_verdicts_for_the_users_model(calibration, images, tmp_path):
    from detector import CalibrationArtifact
    from detector.models import ModelIdentity
    from service.triton.export import repository_identities
    from service.triton.server import TritonServer

    repo = tmp_path / "repo"
    result = _advsentry("export-model", "--out", str(repo), "--name", "lite2", "--factory", FACTORY,
                        "--image-size", str(SIZE), "--calibration", str(calibration), "--max-batch-size", "4")
    assert result.returncode == 0, result.stderr
    identities = repository_identities(repo)
    assert identities["lite2"].name == FACTORY
    triton = TritonServer(repo, env={"ADVSENTRY_PYTHONPATH": str(TESTS)}).start()
    try:
        running = RunningSidecar(make_settings(upstream=triton.grpc_address, calibration=calibration,
                                               disclosure="score"), model_identity=identities)
        try:
            assert running.sidecar.protection_modes == {"lite2": "signals"}
            client = grpcclient.InferenceServerClient(running.address)
            from PIL import Image

            clean = np.asarray(Image.open(sorted(images.iterdir())[0]), dtype=np.float32).transpose(2, 0, 1)[None] / 255
            for pixels in (clean, _fgsm(clean)):
                tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
                tensor.set_data_from_numpy(np.ascontiguousarray(pixels))
                answer = client.infer("lite2", [tensor], outputs=outputs("logits"))
                assert answer.as_numpy("logits").shape == (1, 10)
                params = answer.get_response().parameters
                assert params["advsentry_calibration"].string_param == json.loads(calibration.read_text())["id"]
                assert np.isfinite(params["advsentry_score"].double_param)
                assert params["advsentry_adversarial"].WhichOneof("parameter_choice") == "bool_param"
        finally:
            running.stop()
        # a calibration fitted for other weights is refused at start, not served without verdicts
        artifact = CalibrationArtifact.load(calibration)
        other = tmp_path / "other.json"
        CalibrationArtifact.create(artifact.threshold, artifact.features, ModelIdentity(FACTORY, "0" * 64),
                                   combiner=artifact.combiner).save(other)
        from detector import CalibrationError

        with pytest.raises(CalibrationError, match="weights"):
            RunningSidecar(make_settings(upstream=triton.grpc_address, calibration=other), model_identity=identities)
    finally:
        triton.stop()
