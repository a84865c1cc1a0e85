"""Run the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships.

Why not ``pytriton.triton.Triton``: that class serves Python callables bound in
*this* process through a proxy backend. advsentry instead launches the binary
on a real model repository (the one ``advsentry export-model`` writes), so the
embedded default runs exactly what a production Triton loads, and the sidecar
process never holds the model.

Two environment quirks are handled here (see docs/architecture.md#environment):

- the Python-backend stub links ``libpython3.X.so``; the running interpreter's
  ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` so the stub uses the same Python
  as we do (otherwise models fail with an ``_recursion_count`` error);
- the stub ignores ``PYTHONPATH`` but derives its ``sys.prefix`` from the
  ``python3`` found on ``PATH``, so the running interpreter's ``bin`` directory
  goes first on ``PATH`` (the stub then sees this virtualenv's site-packages),
  and ``ADVSENTRY_PYTHONPATH`` names the directory holding ``detector`` for
  source checkouts that are not installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonGrpcTls:
    """TLS on Triton's gRPC port (``--grpc-use-ssl`` …) and how :class:`TritonServer` then checks readiness.

    ``root_cert`` is the CA that client certificates must chain to; with
    ``mutual`` Triton requires one, so the readiness check presents
    ``client_cert``/``client_key``. ``ca_file`` verifies Triton's certificate
    during that check and ``server_name`` is the name it must carry.
    """

    server_cert: Path
    server_key: Path
    root_cert: Path | None = None
    mutual: bool = False
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def args(self) -> list[str]:
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.server_cert}", f"--grpc-server-key={self.server_key}"]
        if self.root_cert:
            args.append(f"--grpc-root-cert={self.root_cert}")
        if self.mutual:
            args.append("--grpc-use-ssl-mutual=true")
        return args

    def client(self):
        from ..tls import ClientTls

        return ClientTls(self.ca_file, self.client_cert, self.client_key, self.server_name)


class TritonStartError(RuntimeError):
    """tritonserver did not become ready; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port that is free right now on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pytriton_dist_dir() -> Path:
    """The ``tritonserver`` distribution inside the installed ``nvidia-pytriton`` wheel."""
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def _libs_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"


def _project_root() -> Path:
    import detector

    return Path(detector.__file__).resolve().parent.parent


def prepare_backend_directory(target: Path) -> Path:
    """A ``--backend-directory`` whose Python backend has the stub for this interpreter's version."""
    dist = pytriton_dist_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        link = python_dir / name
        if not link.exists():
            link.symlink_to(dist / "backends" / "python" / name)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return target


def triton_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its Python-backend stubs (both quirks fixed)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld_parts = [libdir, str(_libs_dir()), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(part for part in ld_parts if part)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    extra = [str(_project_root()), env.get("ADVSENTRY_PYTHONPATH", "")]
    env["ADVSENTRY_PYTHONPATH"] = os.pathsep.join(part for part in extra if part)
    return env


@dataclass
class TritonServer:
    """One tritonserver process on a model repository; a context manager.

    ``start()`` returns once the server and all its models are ready (or raises
    :class:`TritonStartError` with the log tail). ``stop()`` sends SIGINT, which
    makes Triton finish in-flight requests, then kills after ``stop_timeout_s``.
    """

    model_repository: Path
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    log_verbose: int = 0
    start_timeout_s: float = 180.0
    stop_timeout_s: float = 30.0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to (and overriding) the environment
    grpc_tls: TritonGrpcTls | None = None  # TLS on the gRPC port (issue 13)
    process: subprocess.Popen | None = field(default=None, init=False)
    log_path: Path | None = field(default=None, init=False)
    _workdir: tempfile.TemporaryDirectory | None = field(default=None, init=False)

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self) -> "TritonServer":
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self._workdir = tempfile.TemporaryDirectory(prefix="advsentry-triton-")
        workdir = Path(self._workdir.name)
        backends = prepare_backend_directory(workdir / "backends")
        self.log_path = workdir / "tritonserver.log"
        command = [
            str(pytriton_dist_dir() / "bin" / "tritonserver"),
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={backends}",
            f"--cache-directory={pytriton_dist_dir() / 'caches'}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-cpu-metrics=false",
            "--allow-gpu-metrics=false",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={int(self.stop_timeout_s)}",
            *(self.grpc_tls.args() if self.grpc_tls else []),
            *self.extra_args,
        ]
        LOGGER.info("starting Triton: %s", " ".join(command))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=triton_environment({**os.environ, **self.env}),
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        LOGGER.info("Triton ready on %s (pid %s)", self.grpc_address, self.process.pid)
        return self

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in text[-lines:] if not line.startswith(("+-", "|  ")))

    def _wait_ready(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        from ..tls import secure_or_insecure_channel

        deadline = time.monotonic() + self.start_timeout_s
        with secure_or_insecure_channel(self.grpc_address, self.grpc_tls.client() if self.grpc_tls else None) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise TritonStartError(
                        f"tritonserver exited with code {self.process.returncode} during start-up:\n{self.log_tail()}"
                    )
                try:
                    if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1.0).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
        raise TritonStartError(f"tritonserver not ready after {self.start_timeout_s:.0f}s:\n{self.log_tail()}")

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, no draining (tests use it to simulate a crashed upstream)."""
        if self.is_alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=self.stop_timeout_s + 5)
            except subprocess.TimeoutExpired:
                LOGGER.warning("Triton did not stop in time; killing it")
                self.kill()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
