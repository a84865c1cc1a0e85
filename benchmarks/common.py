"""Shared benchmark plumbing: machine description, repeated timing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as handle:
            info["memory_kib"] = int(handle.readline().split()[1])
    except OSError:
        pass
    return info


def time_repeated(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median and spread of ``repeats`` timed calls after ``warmup`` untimed ones (seconds)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "stdev_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "repeats": len(samples),
    }


def write_result(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    document = {"benchmark": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                "load_average": load_average(), **payload}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: a benchmark taken on a busy machine says so in its JSON."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [float("nan")] * 3


def process_rss_mib(pid: int) -> float:
    """Resident set size of a process (``VmRSS``), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and spread of repeated measurements (any unit)."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "stdev": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "n": len(samples),
    }


IDENTITY_MODEL_PY = '''"""advsentry benchmark model: identity-like, so that the proxy's own cost dominates.

Input ``pixels`` FP32 [B, 3, S, S]. Outputs: ``logits`` FP32 [B, 10] = the first
ten input values of each item; ``advsentry_entropy_*`` FP32 [B, F] (the
per-map entropies an exported model computes in Triton) = the first F input
values; every other configured output (the detector's feature maps) = a copy of
the input, unchanged. Only requested outputs are built.
"""

import json

import triton_python_backend_utils as pb_utils

ENTROPY_PREFIX = "advsentry_entropy_"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        names = [o["name"] for o in config["output"] if o["name"] != "logits"]
        self.entropy = {o["name"]: int(o["dims"][0]) for o in config["output"] if o["name"].startswith(ENTROPY_PREFIX)}
        self.maps = [n for n in names if n not in self.entropy]

    def execute(self, requests):
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, "pixels").as_numpy()
            flat = pixels.reshape(pixels.shape[0], -1)
            names = request.requested_output_names() or ["logits", *self.maps, *self.entropy]
            tensors = []
            for name in names:
                if name == "logits":
                    tensors.append(pb_utils.Tensor("logits", flat[:, :10].copy()))
                elif name in self.entropy:
                    tensors.append(pb_utils.Tensor(name, flat[:, : self.entropy[name]].copy()))
                elif name in self.maps:
                    tensors.append(pb_utils.Tensor(name, pixels.copy()))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


def write_identity_repository(out: Path, feature_outputs: tuple[str, ...], *, name: str = "identity",
                              size: int = 16, max_batch_size: int = 4, entropy_output: str | None = None) -> Path:
    """A Triton model repository holding the identity-like Python-backend model above.

    It returns ``logits`` [10] and, for each of ``feature_outputs`` (the default
    detector's map names), the 3×size×size input as the "feature map", so the
    sidecar scores a real, cheap map with the product's detector. With
    ``entropy_output`` (the default detector's ``entropy_output``), it also
    serves that output as an exported model does, so the sidecar takes the
    in-Triton path (entropies in, no tensor code in the proxy).
    ``max_batch_size`` 4: with 8 or more, Triton 2.51's Python backend
    (nvidia-pytriton 0.7.0) segfaults in ``TRITONBACKEND_ModelInstanceExecute``
    within seconds under 64 concurrent streams called directly, no advsentry
    involved (reproduced with 16 and 8 in the first 15 s; 4 ran clean; a larger
    Python-backend shared-memory pool did not help).
    """
    model_dir = out / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.py").write_text(IDENTITY_MODEL_PY)
    outputs = ['  { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }']
    outputs += [f'  {{ name: "{o}" data_type: TYPE_FP32 dims: [ 3, {size}, {size} ] }}' for o in feature_outputs]
    if entropy_output:
        outputs.append(f'  {{ name: "{entropy_output}" data_type: TYPE_FP32 dims: [ {len(feature_outputs)} ] }}')
    (model_dir / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f'input [\n  {{ name: "pixels" data_type: TYPE_FP32 dims: [ 3, {size}, {size} ] }}\n]\n'
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        "dynamic_batching { }\n"
    )
    return out


class SidecarProcess:
    """``advsentry serve --upstream ...`` as a child process on a free loopback port (a context manager).

    A separate process, as in production: the load generator's event loop and
    GIL are not the sidecar's, and its RSS can be read on its own.
    """

    def __init__(self, upstream: str, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 start_timeout_s: float = 120.0) -> None:
        from service.triton.server import free_port

        self.upstream = upstream
        self.port = free_port()
        self.args = args
        self.env = env or {}
        self.start_timeout_s = start_timeout_s
        self.process: Any = None
        self._log: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def __enter__(self) -> "SidecarProcess":
        import subprocess
        import sys
        import tempfile

        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._log = tempfile.TemporaryFile()
        command = self.command(sys.executable)
        root = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(command, cwd=root, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(root), **self.env})
        deadline = time.monotonic() + self.start_timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"sidecar exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1.0).ready:
                        return self
                except grpc.RpcError:
                    time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"sidecar not ready after {self.start_timeout_s}s:\n{self.log_tail()}")

    def command(self, python: str) -> list[str]:
        return [python, "-c", "from service.cli import app; app()", "serve", "--upstream", self.upstream,
                "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "0",
                "--log-level", "WARNING", *self.args]

    def log_tail(self, chars: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def __exit__(self, *exc: object) -> None:
        import signal
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class NullProxyProcess(SidecarProcess):
    """``benchmarks.null_proxy`` (the floor of a Python gRPC proxy) as a child process, like the sidecar."""

    def command(self, python: str) -> list[str]:
        return [python, "-m", "benchmarks.null_proxy", "--upstream", self.upstream, "--port", str(self.port)]


NGINX_CONF = """
worker_processes 1;
daemon off;
master_process off;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream triton {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} http2;
    http2_max_concurrent_streams 1024;
    location / {{ grpc_pass grpc://triton; }}
  }}
}}
"""


class NginxProcess(SidecarProcess):
    """nginx ``grpc_pass`` (one worker) as a child process: the floor of a *native* proxy with no logic.

    A measuring instrument beside ``NullProxyProcess``: whatever it costs over
    direct Triton is what one more loopback hop through a C proxy costs on this
    machine. Used only where an ``nginx`` binary exists (Debian ``nginx-light``).
    Unary only: on bidirectional streams nginx answers the client's half-close
    with RST_STREAM (INTERNAL), so every stream ends in an error after all its
    messages were answered.
    """

    def __enter__(self) -> "NginxProcess":
        import tempfile

        self._conf_dir = tempfile.TemporaryDirectory(prefix="advsentry-nginx-")
        conf = Path(self._conf_dir.name) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=self._conf_dir.name, upstream=self.upstream, port=self.port))
        super().__enter__()
        return self

    def command(self, python: str) -> list[str]:
        import shutil

        binary = shutil.which("nginx")
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
        return [binary, "-c", str(Path(self._conf_dir.name) / "nginx.conf")]

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._conf_dir.cleanup()
