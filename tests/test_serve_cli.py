"""``advsentry serve --set KEY=VALUE``: every setting reachable from the command line, unknown keys refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from service.commands.serve import settings_assignments
from service.settings import load_settings


def test_set_parses_yaml_values_into_settings():
    values = settings_assignments(["probing_policy=annotate", "capture-sample-rate=0.25",
                                   "trusted_clients=[mtls:ops, 'metadata:x']", "detector_api=false"])
    settings = load_settings(None, **values)
    assert settings.probing_policy.value == "annotate"
    assert settings.capture_sample_rate == 0.25
    assert settings.trusted_clients == ["mtls:ops", "metadata:x"]
    assert settings.detector_api is False


@pytest.mark.parametrize("item", ["no_such_setting=1", "policy"])
def test_set_refuses_unknown_keys_and_missing_values(item):
    with pytest.raises(typer.BadParameter, match="KEY=VALUE"):
        settings_assignments([item])


def test_set_goes_through_the_cli_and_bad_values_exit_2():
    from typer.testing import CliRunner

    from service.cli import app

    result = CliRunner().invoke(app, ["serve", "--set", "max_in_flight=-5"])
    assert result.exit_code == 2
    assert "max_in_flight" in result.output


def test_calibration_settings_take_a_shipped_detectors_name():
    from detector.detector import NAMED_ARTIFACTS
    from service.settings import ModelProtection

    assert load_settings(None, calibration="fixed-signals").calibration == NAMED_ARTIFACTS["fixed-signals"]
    assert ModelProtection(calibration="default").calibration == NAMED_ARTIFACTS["default"]  # per model too
    assert load_settings(None, calibration=Path("fixed-signals")).calibration == NAMED_ARTIFACTS["fixed-signals"]  # as the CLI passes it
    assert str(load_settings(None, calibration="some/cal.json").calibration) == "some/cal.json"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_serve_with_a_named_calibration_serves_that_detectors_signals(tmp_path):
    """``advsentry serve --calibration fixed-signals`` (no upstream): the embedded Triton's model is exported with
    that detector's signals, so the sidecar scores from the in-Triton ``[B, F]`` output under that calibration."""
    import os
    import subprocess
    import sys

    from pathlib import Path

    import torch
    import tritonclient.grpc as grpcclient

    from detector import Detector

    from e2e_triton import infer_input, outputs, photo_pixels, wait_for

    port = _free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "advsentry"), "serve", "--calibration", "fixed-signals", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--disclosure", "score"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"), env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")

        def ready() -> bool:
            try:
                return client.is_model_ready("efficientnet-lite0")
            except Exception:  # not listening yet
                return False

        assert wait_for(ready, timeout=120, interval=0.5), (tmp_path / "serve.log").read_text()[-2000:]
        result = client.infer("efficientnet-lite0", [infer_input(photo_pixels(1))], outputs=outputs("logits"))
        parameters = {k: v for k, v in result.get_response().parameters.items()}
        fixed = Detector.named("fixed-signals", load_model=True)
        assert parameters["advsentry_calibration"].string_param == fixed.calibration_id
        assert "advsentry_error" not in parameters, parameters
        expected = float(fixed.score(torch.from_numpy(photo_pixels(1)))[0])
        assert abs(parameters["advsentry_score"].double_param - expected) < 1e-3 * max(1.0, abs(expected))
        assert result.as_numpy("logits").argmax() == 285
    finally:
        process.terminate()
        process.wait(timeout=30)
