"""A user's model that takes NHWC, 0..255, normalized or FP16 input (issue 21): declared, adapted, identified.

The contract flags (``--input-layout``, ``--input-scale``, ``--input-normalize``,
``--input-dtype``) wrap the user's module in an adapter from advsentry's pixels;
``calibrate run`` and ``export-model`` apply the same adapter and give the
model the same identity, and the Triton-side loader of the exported repository
applies it too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from detector.calibration import CalibrationArtifact
from detector.contract import ContractAdapter, ContractError, InputContract, adapt_model, contract_name

NHWC_255 = ["--input-layout", "nhwc", "--input-scale", "255", "--input-normalize", "127.5,127.5,127.5/128,128,128"]


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    from service.cli import app

    return CliRunner().invoke(app, list(args))


def test_the_adapter_makes_the_models_input_from_advsentrys_pixels():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.zeros(x.shape[0], 4, dtype=x.dtype)

    contract = InputContract.parse("nhwc", 255, "127.5,127.5,127.5/128,128,128", "float16")
    pixels = torch.rand(2, 3, 5, 5)
    logits = ContractAdapter(Recorder(), contract)(pixels)
    expected = ((pixels * 255 - 127.5) / 128).permute(0, 2, 3, 1).half()
    assert seen["x"].shape == (2, 5, 5, 3) and seen["x"].dtype == torch.float16
    assert torch.allclose(seen["x"].float(), expected.float())
    assert logits.dtype == torch.float32  # logits come back as float32 whatever the model computes in
    assert InputContract.from_dict(contract.to_dict()) == contract
    assert InputContract.parse(normalize="imagenet").mean == (0.485, 0.456, 0.406)
    scaled = InputContract.parse(scale=255, normalize="imagenet")  # the same normalization in 0..255 units
    assert scaled.mean == pytest.approx((123.675, 116.28, 103.53)) and scaled.std == pytest.approx((58.395, 57.12, 57.375))
    assert adapt_model(Recorder, InputContract()) is Recorder  # advsentry's own contract: no adapter
    assert contract_name("m:f", contract) == "m:f [nhwc, x255, mean 127.5,127.5,127.5 std 128,128,128, float16]"
    assert contract_name("m:f", InputContract()) == "m:f"
    for bad, match in (({"layout": "chw"}, "layout"), ({"dtype": "int8"}, "dtype"), ({"scale": 0}, "scale"),
                       ({"mean": (1.0, 2.0, 3.0)}, "both"), ({"mean": (1.0,), "std": (1.0,)}, "3 means")):
        with pytest.raises(ContractError, match=match):
            InputContract(**bad)
    with pytest.raises(ContractError, match="imagenet or M,M,M/S,S,S"):
        InputContract.parse(normalize="zero,one")


def test_an_nhwc_0_255_model_is_refused_without_flags_and_calibrated_with_them(tmp_path):
    common = ["calibrate", "run", "--model", "own_models:nhwc_classifier", "--detector", "paper", "--image-size", "32",
              "--min-confidence", "0", "--n-boot", "20", "--chunk-size", "4", "--attack", "fgsm:eps=0.0314",
              "--no-progress", "--min-samples", "off", "--clean-source", "bundled"]
    refused = _invoke(*common, "--out", str(tmp_path / "x.json"))
    assert refused.exit_code == 2
    assert "does not follow the model contract" in refused.output and "--input-layout" in refused.output
    result = _invoke(*common, *NHWC_255, "--out", str(tmp_path / "cal.json"), "--work-dir", str(tmp_path / "w"))
    assert result.exit_code == 0, result.output
    artifact = CalibrationArtifact.load(tmp_path / "cal.json")
    assert artifact.model.name == "own_models:nhwc_classifier [nhwc, x255, mean 127.5,127.5,127.5 std 128,128,128]"
    job = artifact.to_document()["job"]
    assert job["input_contract"]["layout"] == "nhwc" and job["input_contract"]["scale"] == 255
    # the weights hash is of the user's module alone, as for any factory model
    from detector.models import state_dict_sha256
    from own_models import nhwc_classifier

    assert artifact.model.weights_sha256 == state_dict_sha256(nhwc_classifier())
    # verify needs the same contract to recognise the model
    same = _invoke("calibrate", "verify", str(tmp_path / "cal.json"), "--model", "own_models:nhwc_classifier", *NHWC_255)
    assert same.exit_code == 0, same.output
    other = _invoke("calibrate", "verify", str(tmp_path / "cal.json"), "--model", "own_models:nhwc_classifier",
                    "--input-layout", "nhwc")
    assert other.exit_code == 4
    bad = _invoke(*common, "--input-layout", "chw", "--out", str(tmp_path / "y.json"))
    assert bad.exit_code == 2 and "input layout 'chw'" in bad.output
    bundled = _invoke("calibrate", "run", "--input-layout", "nhwc", "--out", str(tmp_path / "z.json"))
    assert bundled.exit_code == 2 and "your own model" in bundled.output


@pytest.mark.slow
def test_export_records_the_contract_and_triton_serves_advsentrys_pixels_through_it(tmp_path):
    from pathlib import Path

    import tritonclient.grpc as grpcclient

    from detector.calibrate.access import load_model
    from service.triton.export import repository_identities
    from service.triton.server import TritonServer

    result = _invoke("export-model", "--out", str(tmp_path / "repo"), "--name", "nhwc", "--factory",
                     "own_models:nhwc_classifier", "--image-size", "32", *NHWC_255)
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "repo" / "nhwc" / "1" / "advsentry_model.json").read_text())
    contract = InputContract.from_dict(spec["source"]["contract"])
    assert contract.layout == "nhwc" and contract.scale == 255
    # the identity export records is the one calibrate gives the same model and contract
    local, identity = load_model("own_models:nhwc_classifier", contract=contract)
    assert repository_identities(tmp_path / "repo")["nhwc"] == identity
    # a real Triton loads the repository: its `pixels` input takes advsentry's NCHW [0, 1] pixels
    triton = TritonServer(tmp_path / "repo", env={"ADVSENTRY_PYTHONPATH": str(Path(__file__).parent)}).start()
    try:
        client = grpcclient.InferenceServerClient(triton.grpc_address)
        pixels = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
        tensor = grpcclient.InferInput("pixels", [2, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(pixels)
        served = client.infer("nhwc", [tensor], outputs=[grpcclient.InferRequestedOutput("logits")]).as_numpy("logits")
    finally:
        triton.stop()
    with torch.no_grad():
        assert np.allclose(served, local(torch.from_numpy(pixels)).numpy(), atol=1e-5)
    plain = _invoke("export-model", "--out", str(tmp_path / "repo2"), "--name", "nhwc", "--factory",
                    "own_models:nhwc_classifier", "--image-size", "32")
    assert plain.exit_code != 0 and "--input-layout" in plain.output
