"""``advsentry serve --set KEY=VALUE``: every setting reachable from the command line, unknown keys refused."""

from __future__ import annotations

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
