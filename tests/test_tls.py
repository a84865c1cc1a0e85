"""TLS and mTLS on both sides of the sidecar, with hot reload (issue 13, item 2).

Real certificates are made here with the ``cryptography`` package (a server CA,
a client CA, a rogue CA nobody trusts, and a CA for Triton's side). One real
tritonserver per module serves gRPC over mutual TLS (``--grpc-use-ssl-mutual``),
so every sidecar here reaches its upstream through TLS with a client
certificate; sidecars run in-process with different listener settings and are
called with the ordinary ``tritonclient.grpc`` client, as a user would.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException

from e2e_triton import MODEL, RunningSidecar, export_bundled, infer_input, make_settings, outputs, photo_pixels, wait_for

# --- a small PKI ---------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Ca:
    """A self-signed CA that issues leaf certificates (ECDSA P-256, valid one day)."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> "Ca":
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server (serverAuth) or a client (clientAuth)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _key_pem(key)


def write_atomically(target: Path, data: bytes) -> Path:
    """Replace a file in one step (as the kubelet swaps a Secret's files), so a reader never sees half of one."""
    temporary = target.with_suffix(".tmp")
    temporary.write_bytes(data)
    temporary.replace(target)
    return target


class Pki:
    """Certificates and keys as files in one directory; ``path(name)`` is ``<dir>/<name>.pem``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.server_ca = Ca.create("advsentry test server CA")
        self.client_ca = Ca.create("advsentry test client CA")
        self.rogue_ca = Ca.create("rogue CA")
        self.triton_ca = Ca.create("triton test CA")
        self.write("server-ca", self.server_ca.pem)
        self.write("client-ca", self.client_ca.pem)
        self.write("rogue-ca", self.rogue_ca.pem)
        self.write("triton-ca", self.triton_ca.pem)
        self.leaf("server", self.server_ca, "advsentry", server=True, dns=("localhost", "advsentry"), ips=("127.0.0.1",))
        self.leaf("client", self.client_ca, "client-1", server=False, dns=("client-1.example",))
        self.leaf("rogue-client", self.rogue_ca, "mallory", server=False)
        # Triton's side: its server certificate, and the sidecar's client certificate for it.
        self.leaf("triton", self.triton_ca, "triton", server=True, dns=("triton.internal",))
        self.leaf("sidecar-to-triton", self.client_ca, "advsentry-sidecar", server=False)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def write(self, name: str, data: bytes) -> Path:
        return write_atomically(self.path(name), data)

    def leaf(self, name: str, ca: Ca, common_name: str, **kwargs) -> None:
        cert, key = ca.issue(common_name, **kwargs)
        self.write(f"{name}-key", key)
        self.write(name, cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _upstream_tls(pki: Pki) -> dict:
    return {"upstream_tls": True, "upstream_ca_file": pki.path("triton-ca"),
            "upstream_cert_file": pki.path("sidecar-to-triton"), "upstream_key_file": pki.path("sidecar-to-triton-key"),
            "upstream_server_name": "triton.internal"}


def _listener_tls(pki: Pki, mutual: bool) -> dict:
    values = {"tls_cert_file": pki.path("server"), "tls_key_file": pki.path("server-key")}
    if mutual:
        values.update(tls_client_ca_file=pki.path("client-ca"), tls_require_client_cert=True)
    return values


# --- settings and file checks (no server) --------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"tls_key_file": "k.pem"}, "needs both tls_cert_file and tls_key_file"),
        ({"tls_cert_file": "c.pem"}, "needs both tls_cert_file and tls_key_file"),
        ({"tls_require_client_cert": True}, "need TLS"),
        ({"tls_cert_file": "c.pem", "tls_key_file": "k.pem", "tls_require_client_cert": True},
         "needs tls_client_ca_file"),
        ({"tls_cert_file": "c.pem", "tls_key_file": "k.pem", "tls_client_ca_file": "ca.pem"},
         "only used with tls_require_client_cert"),
        ({"upstream_ca_file": "ca.pem"}, "only apply with upstream_tls"),
        ({"upstream_tls": True, "upstream_cert_file": "c.pem"}, "needs both upstream_cert_file and upstream_key_file"),
    ],
)
def test_inconsistent_tls_settings_are_refused_with_a_clear_message(values, message):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match=message):
        Settings(**values)


def test_tls_settings_from_env_and_the_serve_command(pki, monkeypatch):
    from typer.testing import CliRunner

    from service.cli import app
    from service.settings import Settings

    monkeypatch.setenv("ADVSENTRY_TLS_CERT_FILE", str(pki.path("server")))
    monkeypatch.setenv("ADVSENTRY_TLS_KEY_FILE", str(pki.path("server-key")))
    monkeypatch.setenv("ADVSENTRY_UPSTREAM_TLS", "true")
    settings = Settings()
    assert settings.tls_cert_file == pki.path("server") and settings.upstream_tls is True
    monkeypatch.delenv("ADVSENTRY_TLS_CERT_FILE")
    result = CliRunner().invoke(app, ["serve", "--upstream", "127.0.0.1:1", "--tls-key-file", "k.pem"])
    assert result.exit_code == 2 and "tls_cert_file" in result.output
    # A key that does not belong to the certificate: refused at start, before anything listens.
    monkeypatch.setenv("ADVSENTRY_TLS_KEY_FILE", str(pki.path("client-key")))
    result = CliRunner().invoke(app, ["serve", "--upstream", "127.0.0.1:1", "--no-upstream-tls",
                                      "--tls-cert-file", str(pki.path("server")), "--metrics-port", "0", "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "does not match the certificate" in result.output


def test_files_are_checked_before_use(pki, tmp_path):
    from service.tls import ClientTls, ServerTls, TlsError

    with pytest.raises(TlsError, match="does not match"):
        ServerTls(pki.path("server"), pki.path("client-key"))
    with pytest.raises(TlsError, match="cannot read"):
        ServerTls(tmp_path / "missing.pem", pki.path("server-key"))
    (tmp_path / "garbage.pem").write_text("not a certificate")
    with pytest.raises(TlsError, match="not a PEM certificate"):
        ServerTls(pki.path("server"), pki.path("server-key"), tmp_path / "garbage.pem", require_client_cert=True)
    with pytest.raises(TlsError, match="not a PEM certificate"):
        ClientTls(ca_file=tmp_path / "garbage.pem").credentials()


def test_mtls_subject_is_in_the_auth_context(pki):
    """What other parts (service/clients.py) read: the client certificate's CN and SANs."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.tls import ServerTls, peer_identity

    seen: dict = {}

    class Health(health_pb2_grpc.HealthServicer):
        async def Check(self, request, context):  # noqa: N802 - gRPC name
            seen.update(context.auth_context())
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def scenario() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
        tls = ServerTls(pki.path("server"), pki.path("server-key"), pki.path("client-ca"), require_client_cert=True)
        port = server.add_secure_port("127.0.0.1:0", tls.credentials())
        await server.start()
        credentials = grpc.ssl_channel_credentials(pki.server_ca.pem, pki.path("client-key").read_bytes(),
                                                   pki.path("client").read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        await server.stop(0)

    asyncio.run(scenario())
    assert seen["x509_common_name"] == [b"client-1"]
    assert seen["x509_subject_alternative_name"] == [b"client-1.example"]
    assert seen["transport_security_type"] == [b"ssl"]
    assert peer_identity(seen) == {"x509_common_name": ["client-1"],
                                   "x509_subject_alternative_name": ["client-1.example"],
                                   "x509_subject": ["CN=client-1"]}


# --- a real Triton over mutual TLS, real sidecars ------------------------------------------------

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def triton(pki, tmp_path_factory):
    from service.triton.server import TritonGrpcTls, TritonServer

    tls = TritonGrpcTls(
        server_cert=pki.path("triton"), server_key=pki.path("triton-key"), root_cert=pki.path("client-ca"),
        mutual=True, ca_file=pki.path("triton-ca"), client_cert=pki.path("sidecar-to-triton"),
        client_key=pki.path("sidecar-to-triton-key"), server_name="triton.internal",
    )
    server = TritonServer(export_bundled(tmp_path_factory.mktemp("repo")), grpc_tls=tls)
    server.start()
    yield server
    server.stop()


def _sidecar(triton, pki: Pki, *, mutual: bool = False, listener_tls: bool = True, **values) -> RunningSidecar:
    from detector.models import bundled_identity

    # A generous upstream deadline: on a busy 2-core machine the CPU Triton can take many seconds per call.
    settings = {"upstream_timeout_s": 120.0, **_upstream_tls(pki), **(_listener_tls(pki, mutual) if listener_tls else {}),
                **values}
    return RunningSidecar(make_settings(upstream=triton.grpc_address, **settings),
                          model_identity={MODEL: bundled_identity()})


def _client(address: str, pki: Pki, *, ca: str | None = "server-ca", cert: str | None = None):
    if ca is None:
        return grpcclient.InferenceServerClient(address)
    return grpcclient.InferenceServerClient(
        address, ssl=True, root_certificates=str(pki.path(ca)),
        private_key=str(pki.path(f"{cert}-key")) if cert else None,
        certificate_chain=str(pki.path(cert)) if cert else None,
    )


def _infer(client) -> np.ndarray:
    return client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"),
                        client_timeout=120).as_numpy("logits")


def _refused(client) -> InferenceServerException:
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"), client_timeout=60)
    finally:
        client.close()  # a refused channel would otherwise keep reconnecting in the background
    return caught.value


@slow
def test_triton_itself_requires_tls_with_a_client_certificate(triton, pki):
    """The upstream really is mutual TLS: a plaintext or certificate-less client is refused by Triton."""
    plain = grpcclient.InferenceServerClient(triton.grpc_address)
    with pytest.raises(InferenceServerException):
        plain.is_server_ready(client_timeout=10)
    no_cert = grpcclient.InferenceServerClient(triton.grpc_address, ssl=True,
                                               root_certificates=str(pki.path("triton-ca")),
                                               channel_args=[("grpc.ssl_target_name_override", "triton.internal")])
    with pytest.raises(InferenceServerException):
        no_cert.is_server_ready(client_timeout=10)


@slow
def test_tls_listener_refuses_plaintext_and_serves_tls(triton, pki):
    running = _sidecar(triton, pki)
    try:
        error = _refused(_client(running.address, pki, ca=None))
        assert error.status() == "StatusCode.UNAVAILABLE"
        # A client that trusts another CA refuses the sidecar's certificate.
        assert _refused(_client(running.address, pki, ca="rogue-ca")).status() == "StatusCode.UNAVAILABLE"
        client = _client(running.address, pki)
        logits = _infer(client)
        assert logits.shape == (1, 1000)
        # Served through the mutual-TLS upstream: the same answer as Triton's own.
        direct = grpcclient.InferenceServerClient(
            triton.grpc_address, ssl=True, root_certificates=str(pki.path("triton-ca")),
            private_key=str(pki.path("sidecar-to-triton-key")), certificate_chain=str(pki.path("sidecar-to-triton")),
            channel_args=[("grpc.ssl_target_name_override", "triton.internal")])
        np.testing.assert_array_equal(logits, _infer(direct))
        # Pass-through RPCs and the metadata lookup go over the TLS upstream too.
        assert client.get_model_metadata(MODEL).name == MODEL
        assert client.is_server_ready()
    finally:
        running.stop()


@slow
def test_mtls_refuses_missing_and_untrusted_client_certificates_and_serves_a_valid_one(triton, pki):
    running = _sidecar(triton, pki, mutual=True)
    try:
        assert _refused(_client(running.address, pki, ca=None)).status() == "StatusCode.UNAVAILABLE"
        assert _refused(_client(running.address, pki)).status() == "StatusCode.UNAVAILABLE"  # no client cert
        assert _refused(_client(running.address, pki, cert="rogue-client")).status() == "StatusCode.UNAVAILABLE"
        # A server certificate is not a client certificate from the client CA either.
        assert _refused(_client(running.address, pki, cert="server")).status() == "StatusCode.UNAVAILABLE"
        client = _client(running.address, pki, cert="client")
        logits = _infer(client)
        assert logits.shape == (1, 1000)
        # Streaming over mTLS: every message answered.
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for index in range(3):
                client.async_stream_infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"),
                                          request_id=str(index))
            received = [answers.get(timeout=240) for _ in range(3)]
        finally:
            client.stop_stream()
        assert [error for _, error in received] == [None, None, None], [str(e) for _, e in received]
        assert sorted(result.get_response().id for result, _ in received) == ["0", "1", "2"]
    finally:
        running.stop()


@slow
def test_health_probe_speaks_tls_to_the_sidecar_and_to_triton(triton, pki, capsys):
    from service import health_probe

    running = _sidecar(triton, pki, mutual=True)
    try:
        mtls = ["--ca-file", str(pki.path("server-ca")), "--cert-file", str(pki.path("client")),
                "--key-file", str(pki.path("client-key")), "--timeout", "10"]
        assert wait_for(lambda: health_probe.main(["--address", running.address, *mtls]) == 0, timeout=30)
        assert health_probe.main(["--address", running.address, "--timeout", "5"]) == 1  # plaintext
        assert health_probe.main(["--address", running.address, "--tls", "--ca-file", str(pki.path("server-ca")),
                                  "--timeout", "5"]) == 1  # no client certificate
        triton_args = ["--address", triton.grpc_address, "--triton", "ready", "--ca-file", str(pki.path("triton-ca")),
                       "--cert-file", str(pki.path("sidecar-to-triton")),
                       "--key-file", str(pki.path("sidecar-to-triton-key")), "--server-name", "triton.internal"]
        assert health_probe.main(triton_args) == 0
        assert health_probe.main(["--address", triton.grpc_address, "--triton", "ready", "--timeout", "5"]) == 1
    finally:
        running.stop()
    assert "SERVING" in capsys.readouterr().out


@slow
def test_upstream_with_an_untrusted_certificate_is_not_served(triton, pki):
    """TLS towards Triton really verifies: trusting the wrong CA means no upstream (health NOT_SERVING)."""
    running = _sidecar(triton, pki, listener_tls=False, upstream_ca_file=pki.path("rogue-ca"))
    try:
        client = _client(running.address, pki, ca=None)
        error = _refused(client)
        assert error.status() == "StatusCode.UNAVAILABLE" and "upstream" in error.message()
        with pytest.raises(InferenceServerException, match="CERTIFICATE_VERIFY_FAILED"):
            _client(running.address, pki, ca=None).is_server_ready()  # pass-through: the upstream's TLS failure
        from service import health_probe

        assert health_probe.main(["--address", running.address, "--live"]) == 0  # the sidecar itself is up
        assert health_probe.main(["--address", running.address]) == 1  # NOT_SERVING: no usable upstream
    finally:
        running.stop()


class _Load:
    """Calls ModelInfer in a loop on one client (one connection) from a thread; records every outcome."""

    def __init__(self, client) -> None:
        self.client = client
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _infer(self.client)
                self.ok += 1
            except InferenceServerException as error:
                self.errors.append(f"{error.status()}: {error.message()}")

    def __enter__(self) -> "_Load":
        self._thread.start()
        assert wait_for(lambda: self.ok >= 2 or bool(self.errors), timeout=240)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(150)


@slow
def test_listener_certificate_reload_reaches_new_connections_without_failing_calls(triton, pki, tmp_path):
    """Replace the listener's certificate (issued by a new CA) under load."""
    # A private copy of the listener files, so other tests keep theirs.
    cert_file = write_atomically(tmp_path / "server.pem", pki.path("server").read_bytes())
    key_file = write_atomically(tmp_path / "server-key.pem", pki.path("server-key").read_bytes())
    running = _sidecar(triton, pki, tls_cert_file=cert_file, tls_key_file=key_file, tls_reload_interval_s=0.1)
    try:
        with _Load(_client(running.address, pki)) as load:
            new_ca = Ca.create("advsentry rotated server CA")
            pki.write("rotated-ca", new_ca.pem)
            cert, key = new_ca.issue("advsentry", server=True, dns=("localhost",), ips=("127.0.0.1",))
            write_atomically(key_file, key)  # key first: a moment with a mismatched pair, which must be skipped
            assert wait_for(lambda: running.sidecar.server_tls.failed_reloads >= 1, timeout=20)
            write_atomically(cert_file, cert)
            assert wait_for(lambda: running.sidecar.server_tls.reloads == 1, timeout=20)
            before = load.ok
            assert wait_for(lambda: load.ok >= before + 3, timeout=240)
        assert load.errors == [], load.errors
        # New connections get the new certificate: trusted by the new CA only.
        assert _infer(_client(running.address, pki, ca="rotated-ca")).shape == (1, 1000)
        assert _refused(_client(running.address, pki)).status() == "StatusCode.UNAVAILABLE"
        assert running.sidecar.server_tls.failed_reloads >= 1  # the half-written moment was refused, not used
    finally:
        running.stop()


@slow
def test_upstream_certificate_reload_swaps_the_channel_without_failing_calls(triton, pki, tmp_path):
    """Replace the sidecar's client certificate towards Triton under load; a bad one really takes effect."""
    cert_file = write_atomically(tmp_path / "to-triton.pem", pki.path("sidecar-to-triton").read_bytes())
    key_file = write_atomically(tmp_path / "to-triton-key.pem", pki.path("sidecar-to-triton-key").read_bytes())
    running = _sidecar(triton, pki, listener_tls=False, upstream_cert_file=cert_file, upstream_key_file=key_file,
                       tls_reload_interval_s=0.1)
    channel = running.sidecar.upstream.channel
    try:
        with _Load(_client(running.address, pki, ca=None)) as load:
            cert, key = pki.client_ca.issue("advsentry-sidecar-renewed", server=False)
            write_atomically(cert_file, cert)
            write_atomically(key_file, key)
            assert wait_for(lambda: channel.reloads >= 1, timeout=20)
            before = load.ok
            assert wait_for(lambda: load.ok >= before + 3, timeout=240)
        assert load.errors == [], load.errors
        # The swapped-in channel is the one in use: a certificate Triton does not trust now fails the calls.
        reloads = channel.reloads
        cert, key = pki.rogue_ca.issue("mallory", server=False)
        write_atomically(cert_file, cert)
        write_atomically(key_file, key)
        assert wait_for(lambda: channel.reloads == reloads + 1, timeout=20)
        client = _client(running.address, pki, ca=None)
        assert _refused(client).status() == "StatusCode.UNAVAILABLE"
    finally:
        running.stop()
