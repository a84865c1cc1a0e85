"""Calibration against a real Triton: black box with probing (counted queries), model served only by Triton, sidecar.

One ``tritonserver`` (nvidia-pytriton's binary) serves a repository written by
the exporter: the bundled EfficientNet-Lite0 with the default detector's maps,
and the small test CNN (``calibrate_models:target_cnn``) with the paper's map.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from detector import FEATURE_RESPONSE, PAPER_CONFIG, CalibrationArtifact, CalibrationError, Detector
from detector.calibrate import AttackSpec, CalibrationJob, JobConfig
from detector.calibrate.report import markdown_table, write_report
from detector.models import bundled_identity, state_dict_sha256
from e2e_triton import MODEL, RunningSidecar, export_bundled, export_small_cnn, infer_input, make_settings, outputs, photo_pixels, wait_for

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
PROBING = ("square:eps=0.0157,n_queries=30", "hopskipjump:max_iter=1,max_eval=20,init_eval=5,init_size=10",
           "one_pixel:popsize=20,max_iter=2")


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from service.triton.server import TritonServer

    repo = export_small_cnn(export_bundled(tmp_path_factory.mktemp("repo")), "small")
    server = TritonServer(repo, env={"ADVSENTRY_PYTHONPATH": str(TESTS_DIR)})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def probed(triton, tmp_path_factory):
    """Bundled model, bundled photos, four attacks; the three query attacks probe the model through Triton."""
    root = tmp_path_factory.mktemp("probed")
    config = JobConfig(
        triton_url=triton.grpc_address, triton_model=MODEL, query_via_triton=True,
        crops_per_photo=2, min_confidence=0.2, n_boot=200,
        attacks=tuple(AttackSpec.parse(text) for text in ("fgsm:eps=0.00784", *PROBING)),
    )
    job = CalibrationJob(config, root / "work", progress=False)
    endpoint = job.runtime().endpoint
    before = endpoint.inference_count()
    job.run()
    sent = endpoint.images_sent
    # Triton updates its statistics just after answering: give the last requests a moment to be counted
    wait_for(lambda: endpoint.inference_count() - before >= sent, timeout=10)
    triton_counted = endpoint.inference_count() - before
    artifact, result, banks = job.finalize()
    artifact.save(root / "cal.json")
    saved = CalibrationArtifact.load(root / "cal.json")
    write_report(root / "cal.html", saved, result, banks)
    print(f"\n{markdown_table(saved)}images sent to Triton {sent}, Triton inference_count delta {triton_counted}")
    return root, saved, sent, triton_counted


def test_black_box_probing_goes_through_triton_and_counts_queries(probed):
    root, artifact, sent, triton_counted = probed
    assert sent > 0 and sent == triton_counted  # every image we sent is one Triton inference, nothing else reached it
    attacks = artifact.results["attacks"]
    probing = [spec.split(":")[0] for spec in PROBING]
    for name in probing:
        assert attacks[name]["scenario"] == "black_box_probing" and attacks[name]["queries_total"] > 0
    # counted queries are the attacks' probes; the rest of `sent` are uncounted bookkeeping predictions
    assert sum(attacks[name]["queries_total"] for name in probing) <= sent
    assert attacks["fgsm"]["scenario"] == "white_box" and "queries_total" not in attacks["fgsm"]
    assert artifact.job["query_via_triton"] is True and (root / "cal.html").stat().st_size > 10_000


def test_artifact_is_in_force_in_the_detector_and_a_running_sidecar(triton, probed, tmp_path):
    root, artifact, _, _ = probed
    detector = Detector.default()
    detector.load_calibration(root / "cal.json")
    assert detector.threshold == artifact.threshold and detector.calibration_id == artifact.id

    from detector import DEFAULT_ARTIFACT_PATH
    from service._proto.advsentry.v1 import detector_pb2, detector_pb2_grpc
    from service.triton.server import free_port

    live = tmp_path / "live.json"  # the sidecar starts on the shipped default, then hot-reloads the calibration
    live.write_text(DEFAULT_ARTIFACT_PATH.read_text())
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, calibration=live, calibration_poll_s=0.1,
                                           metrics_port=free_port(), disclosure="score"),
                             model_identity={MODEL: bundled_identity()})
    try:
        client = grpcclient.InferenceServerClient(running.address)

        def in_force() -> tuple[float, str]:
            params = client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits")).get_response().parameters
            return params["advsentry_threshold"].double_param, params["advsentry_calibration"].string_param

        assert in_force()[1] == CalibrationArtifact.load(DEFAULT_ARTIFACT_PATH).id
        live.write_text((root / "cal.json").read_text())
        assert wait_for(lambda: in_force() == (artifact.threshold, artifact.id), timeout=20)
        with grpc.insecure_channel(running.address) as channel:
            status = detector_pb2_grpc.DetectorServiceStub(channel).GetStatus(detector_pb2.GetStatusRequest())
        model = next(m for m in status.models if m.model_name == MODEL)
        assert model.calibration_id == artifact.id and model.threshold == artifact.threshold
        assert model.calibration_source == str(live)
        assert f'calibration_id="{artifact.id}"' in running.sidecar.metrics.exposition().decode()
    finally:
        running.stop()

    # what the sidecar's registry does with a tampered file, and with a valid one made for other weights
    import dataclasses

    from detector.models import ModelIdentity
    from service.core.detectors import DetectorRegistry

    document = json.loads((root / "cal.json").read_text())
    document["threshold"] = 0.0
    (tmp_path / "tampered.json").write_text(json.dumps(document))
    with pytest.raises(CalibrationError, match="checksum mismatch"):
        DetectorRegistry(default_calibration=tmp_path / "tampered.json", model_identity={MODEL: bundled_identity()})
    dataclasses.replace(artifact, model=ModelIdentity(MODEL, "0" * 64), id="").save(tmp_path / "other.json")
    registry = DetectorRegistry(default_calibration=tmp_path / "other.json", model_identity={MODEL: bundled_identity()})
    with pytest.raises(CalibrationError, match="model weights: artifact sha256 000000000000"):
        registry.get(MODEL)


def test_a_model_only_triton_serves_is_scored_through_its_feature_outputs(triton, tmp_path):
    """--model triton: labels, maps and attack queries all come from the endpoint, and match local scoring."""
    from calibrate_models import target_cnn

    common = dict(detector="paper", image_size=32, crops_per_photo=1, min_confidence=0.0, n_boot=50,
                  attacks=(AttackSpec.parse("square:eps=0.05,n_queries=10"),))
    remote = CalibrationJob(JobConfig(model="triton", triton_url=triton.grpc_address, triton_model="small",
                                      model_name="calibrate_models:target_cnn",
                                      weights_sha256=state_dict_sha256(target_cnn()), **common), tmp_path / "r", progress=False)
    local = CalibrationJob(JobConfig(model="calibrate_models:target_cnn", **common), tmp_path / "l", progress=False)
    # a local model for white-box attacks whose labels and maps still come from the served copy
    mixed = CalibrationJob(JobConfig(model="calibrate_models:target_cnn", triton_url=triton.grpc_address,
                                     triton_model="small", score_via_triton=True,
                                     **{**common, "attacks": (AttackSpec.parse("fgsm:eps=0.0314"),)}), tmp_path / "m", progress=False)
    for job in (remote, local, mixed):
        job.run()
    (remote_artifact, remote_result, _), (local_artifact, local_result, _) = remote.finalize(), local.finalize()
    mixed_artifact, mixed_result, _ = mixed.finalize()
    assert remote_artifact.model == local_artifact.model == mixed_artifact.model
    assert remote_artifact.job["scoring"] == mixed_artifact.job["scoring"] == "triton"
    for result in (remote_result, mixed_result):
        np.testing.assert_allclose(result.scores["clean_holdout"], local_result.scores["clean_holdout"], atol=1e-6)
    assert remote_artifact.results["attacks"]["square"]["queries_total"] > 0
    assert mixed_artifact.results["attacks"]["fgsm"]["successful"] > 0
