"""A tiny gRPC health probe: ``python -m service.health_probe [--address HOST:PORT] [--live | --triton ready]``.

Why it exists: the container image's ``HEALTHCHECK`` and the Kubernetes exec
probes need a gRPC health client, and shipping our own (grpcio is already in
the image) avoids downloading a separate ``grpc_health_probe`` binary at build
time. It imports only grpcio's health stubs, so one probe costs a fraction of a
second.

Modes (exit 0 = healthy, 1 = unhealthy, 2 = usage error):

- default: ``grpc.health.v1.Health/Check`` must answer SERVING. The sidecar
  answers SERVING only while its upstream Triton is ready, so this is a
  *readiness* check.
- ``--live``: any answer (SERVING or NOT_SERVING) passes. It proves the
  sidecar's gRPC server and event loop respond, without coupling the
  sidecar's liveness to Triton's readiness (restarting the sidecar because
  Triton is loading a model would not help).
- ``--triton live|ready``: Triton's own ``ServerLive`` / ``ServerReady`` RPC on
  its (pod-local) gRPC port, for probing a Triton that is bound to loopback
  and so unreachable by the kubelet's network probes.

TLS (the kubelet's native gRPC probe cannot do TLS, so a TLS sidecar is probed
with this): ``--tls`` with ``--ca-file`` (verifies the server; default: system
roots), ``--cert-file``/``--key-file`` (a client certificate, for a listener
that requires one) and ``--server-name`` (the name in the server certificate
when probing 127.0.0.1). Each ``--*-file`` implies ``--tls``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _channel(address: str, tls):
    from service.tls import secure_or_insecure_channel

    return secure_or_insecure_channel(address, tls)


def _check_health(address: str, service: str, timeout: float, live: bool, tls=None) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return False, f"{address}: health check failed: {error.code().name} {error.details() or ''}".strip()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    ok = live or reply.status == health_pb2.HealthCheckResponse.SERVING
    return ok, f"{address}: {status}"


def _check_triton(address: str, what: str, timeout: float, tls=None) -> tuple[bool, str]:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with _channel(address, tls) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            if what == "live":
                ok = stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout).live
            else:
                ok = stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout).ready
        except grpc.RpcError as error:
            return False, f"{address}: Triton {what} check failed: {error.code().name}"
    return ok, f"{address}: Triton {what}={ok}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.health_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:8001", help="HOST:PORT to probe (default 127.0.0.1:8001).")
    parser.add_argument("--service", default="", help="grpc.health.v1 service name (default: overall status).")
    parser.add_argument("--timeout", type=float, default=2.0, help="Seconds to wait for the answer.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true", help="Pass on any health answer, SERVING or not.")
    mode.add_argument("--triton", choices=("live", "ready"), help="Probe Triton's ServerLive/ServerReady instead.")
    tls_group = parser.add_argument_group("TLS")
    tls_group.add_argument("--tls", action="store_true", help="Connect with TLS.")
    tls_group.add_argument("--ca-file", type=Path, help="PEM CA bundle that verifies the server (implies --tls).")
    tls_group.add_argument("--cert-file", type=Path, help="PEM client certificate, for mTLS (implies --tls).")
    tls_group.add_argument("--key-file", type=Path, help="PEM key of --cert-file (implies --tls).")
    tls_group.add_argument("--server-name", help="Name expected in the server certificate (implies --tls).")
    args = parser.parse_args(argv)
    if bool(args.cert_file) != bool(args.key_file):
        parser.error("--cert-file and --key-file go together")
    tls = None
    if args.tls or args.ca_file or args.cert_file or args.server_name:
        from service.tls import ClientTls

        tls = ClientTls(args.ca_file, args.cert_file, args.key_file, args.server_name)
    try:
        if args.triton:
            ok, message = _check_triton(args.address, args.triton, args.timeout, tls)
        else:
            ok, message = _check_health(args.address, args.service, args.timeout, args.live, tls)
    except ValueError as error:  # service.tls.TlsError: unreadable or inconsistent files
        ok, message = False, f"{args.address}: {error}"
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover - exercised through the subprocess in tests
    sys.exit(main())
