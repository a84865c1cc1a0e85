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


# --- settings grouped by feature (issue 20 item 6): every key, env variable and flag of before still works ---

#: The keys before the settings were grouped: the compatibility contract (new keys may be added, none removed).
KEYS_BEFORE_GROUPING = (
    "host port metrics_port metrics_host upstream calibration calibration_poll_s policy scoring_failure models "
    "protect_all max_batch_size max_batch_delay_ms entropy_in device upstream_timeout_s max_message_bytes "
    "shutdown_grace_s health_poll_s tls_cert_file tls_key_file tls_client_ca_file tls_require_client_cert "
    "upstream_tls upstream_ca_file upstream_cert_file upstream_key_file upstream_server_name tls_reload_interval_s "
    "embedded_model_repository embedded_max_batch_size client_id_metadata_key disclosure trusted_clients "
    "trusted_metadata detector_api max_in_flight max_in_flight_per_client capture_dir capture_max_items "
    "capture_max_bytes capture_sample_rate capture_max_age_s capture_queue_size probing_policy probing_threshold "
    "probing_k probing_min_queries probing_history probing_max_clients probing_cooldown_s probing_allow_clients "
    "traffic_sketch traffic_state_path traffic_flush_s traffic_window_s traffic_max_windows "
    "traffic_relative_accuracy log_level config_file"
).split()
#: One non-default value per key (as an env variable would carry it) and what it must parse to.
NON_DEFAULT = {
    "host": ("127.0.0.2", "127.0.0.2"), "port": ("9001", 9001), "metrics_port": ("0", 0),
    "upstream": ("triton:8001", "triton:8001"), "calibration_poll_s": ("5", 5.0), "policy": ("shadow", "shadow"),
    "scoring_failure": ("closed", "closed"), "protect_all": ("false", False), "max_batch_size": ("4", 4),
    "max_batch_delay_ms": ("0.5", 0.5), "entropy_in": ("sidecar", "sidecar"), "device": ("cuda:1", "cuda:1"),
    "upstream_timeout_s": ("3", 3.0), "max_message_bytes": ("4096", 4096), "shutdown_grace_s": ("1", 1.0),
    "health_poll_s": ("9", 9.0), "tls_reload_interval_s": ("7", 7.0), "embedded_max_batch_size": ("2", 2),
    "client_id_metadata_key": ("x-client-id", "x-client-id"), "disclosure": ("none", "none"),
    "trusted_clients": ('["mtls:ops"]', ["mtls:ops"]), "trusted_metadata": ('["k=v"]', ["k=v"]),
    "detector_api": ("false", False), "max_in_flight": ("3", 3), "max_in_flight_per_client": ("2", 2),
    "capture_max_items": ("5", 5), "capture_sample_rate": ("0.5", 0.5), "capture_queue_size": ("3", 3),
    "probing_policy": ("annotate", "annotate"), "probing_threshold": ("0.3", 0.3), "probing_k": ("5", 5),
    "probing_min_queries": ("4", 4), "probing_history": ("50", 50), "probing_max_clients": ("9", 9),
    "probing_cooldown_s": ("1", 1.0), "probing_allow_clients": ('["peer:x"]', ["peer:x"]),
    "traffic_sketch": ("false", False), "traffic_flush_s": ("2", 2.0), "traffic_window_s": ("60", 60.0),
    "traffic_max_windows": ("3", 3), "traffic_relative_accuracy": ("0.01", 0.01), "log_level": ("DEBUG", "DEBUG"),
    "stream_max_in_flight": ("4", 4), "strip_metadata": ('["x-internal"]', ["x-internal"]),
}


def _plain(value):
    return getattr(value, "value", value)


def test_every_key_of_before_the_grouping_is_still_a_setting():
    from service.settings import Settings

    assert set(KEYS_BEFORE_GROUPING) <= set(Settings.model_fields)


@pytest.mark.parametrize("key", sorted(NON_DEFAULT))
def test_each_setting_is_read_from_env_yaml_and_set(key, monkeypatch, tmp_path):
    import yaml

    raw, expected = NON_DEFAULT[key]
    monkeypatch.setenv(f"ADVSENTRY_{key.upper()}", raw)
    assert _plain(getattr(load_settings(None), key)) == expected
    monkeypatch.delenv(f"ADVSENTRY_{key.upper()}")
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({key: yaml.safe_load(raw)}))
    assert _plain(getattr(load_settings(config), key)) == expected
    assert _plain(getattr(load_settings(None, **settings_assignments([f"{key}={raw}"])), key)) == expected


def test_the_dedicated_serve_flags_of_before_still_exist():
    from typer.testing import CliRunner

    from service.cli import app

    text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--port", "--metrics-port", "--upstream", "--calibration", "--policy", "--config", "--host",
                 "--scoring-failure", "--max-batch-size", "--max-batch-delay-ms", "--entropy-in", "--device",
                 "--upstream-timeout-s", "--max-message-bytes", "--shutdown-grace-s", "--model-repository",
                 "--log-level", "--tls-cert-file", "--tls-key-file", "--tls-client-ca-file",
                 "--tls-require-client-cert", "--upstream-tls", "--upstream-ca-file", "--upstream-cert-file",
                 "--upstream-key-file", "--upstream-server-name", "--tls-reload-interval-s", "--set", "--disclosure",
                 "--trusted-client", "--detector-api", "--max-in-flight", "--max-in-flight-per-client"):
        assert flag in text, flag
