"""TLS and mTLS for the sidecar, on both sides, with certificates hot-reloaded from files.

Why one module: the listening port (clients → sidecar) and the upstream channel
(sidecar → Triton) both read PEM files that a certificate manager rotates on
disk (cert-manager renews a Kubernetes Secret; the kubelet swaps the mounted
files), and both must pick up the new files without a restart and without
failing calls in flight, like the calibration hot reload.

- :class:`ServerTls` builds ``grpc.dynamic_ssl_server_credentials``: gRPC calls
  its fetcher before every new TLS handshake. The files' ``(mtime, size,
  inode)`` are checked at most every ``reload_interval_s`` (by the fetcher and
  by :meth:`ServerTls.watch`, so a rotation is logged even while no client
  connects); when they changed and their content differs, the next handshake
  gets the new certificate, key and client CA. Established connections keep
  the certificate they negotiated; new connections get the new one.
- :class:`ReloadingChannel` is what :class:`service.upstream.Upstream` uses as
  its ``grpc.aio`` channel: a facade whose multi-callables always go through
  the *current* channel. When the CA bundle or client certificate change, it
  builds a new channel, swaps it in for new calls, and closes the old one with
  a grace period, so calls in flight on it finish.

Files are checked with the ``cryptography`` package before they are used (PEM
parses, the key matches the certificate), so a half-written or mismatched pair
is refused with a clear error at start-up and, during a reload, logged while
the previous certificate stays in service.

The authenticated client of an mTLS connection is visible to handlers through
``context.auth_context()``: ``x509_common_name`` (the subject CN),
``x509_subject_alternative_name`` (every SAN), ``x509_subject`` (the full
subject), ``x509_pem_cert`` and ``transport_security_type`` (``ssl``); see
:func:`peer_identity`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

LOGGER = logging.getLogger(__name__)


class TlsError(ValueError):
    """A TLS file is missing, unreadable or inconsistent (e.g. the key does not match the certificate)."""


FileSignature = tuple[tuple[int, int, int] | None, ...]


def file_signature(paths: Sequence[Path]) -> FileSignature:
    """``(mtime_ns, size, inode)`` of each file (``None`` when missing): cheap change detection."""
    signature = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            signature.append(None)
        else:
            signature.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(signature)


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TlsError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if not data.strip():
        raise TlsError(f"{what} {path} is empty")
    return data


def _certificates(pem: bytes, what: str, path: Path) -> list:
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise TlsError(f"{what} {path} is not a PEM certificate: {error}") from None
    return certificates


def check_key_pair(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> Any:
    """Parse a certificate chain and its private key; raise :class:`TlsError` unless the key matches.

    Returns the leaf certificate (a ``cryptography.x509.Certificate``).
    """
    from cryptography.hazmat.primitives import serialization

    leaf = _certificates(cert_pem, "certificate", cert_path)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise TlsError(f"private key {key_path} is not an unencrypted PEM key: {error}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, public) != leaf.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ):
        raise TlsError(f"private key {key_path} does not match the certificate {cert_path}")
    return leaf


def _describe(leaf: Any) -> str:
    return f"subject {leaf.subject.rfc4514_string()!r}, valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


# --- the listening port --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTlsMaterial:
    """One consistent set of PEM bytes for the listening port."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    description: str

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.certificate_chain)], root_certificates=self.client_ca
        )


class ServerTls:
    """TLS (optionally mTLS) credentials for the listening port, reloaded from files on change."""

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        client_ca_file: Path | None = None,
        *,
        require_client_cert: bool = False,
        reload_interval_s: float = 5.0,
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file else None
        self.require_client_cert = require_client_cert
        self.reload_interval_s = reload_interval_s
        self.on_reload = on_reload  # called with True (new material in use) / False (reload refused)
        self.reloads = 0
        self.failed_reloads = 0
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._signature = file_signature(self._paths())
        self.material = self.load()
        self._given = self.material  # what gRPC has been handed last
        LOGGER.info("TLS on the listening port: %s%s", self.material.description,
                    ", client certificates required" if require_client_cert else "")

    def _paths(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def load(self) -> ServerTlsMaterial:
        """Read and check the files; raise :class:`TlsError` when they are not usable."""
        cert = _read(self.cert_file, "certificate")
        key = _read(self.key_file, "private key")
        leaf = check_key_pair(cert, key, self.cert_file, self.key_file)
        client_ca = None
        if self.client_ca_file is not None:
            client_ca = _read(self.client_ca_file, "client CA bundle")
            _certificates(client_ca, "client CA bundle", self.client_ca_file)
        return ServerTlsMaterial(cert, key, client_ca, _describe(leaf))

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``server.add_secure_port``; every new handshake may pick up new files."""
        return grpc.dynamic_ssl_server_credentials(
            self.material.configuration(), self._fetch, require_client_authentication=self.require_client_cert
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake fetcher: ``None`` keeps the current configuration."""
        try:
            self.poll()
            with self._lock:
                if self.material is self._given:
                    return None
                self._given = self.material
                return self.material.configuration()
        except Exception:  # noqa: BLE001 - never break a handshake because of the reload logic
            LOGGER.exception("TLS reload check failed")
            return None

    async def watch(self) -> None:
        """Check the files every ``reload_interval_s`` (a task; the next handshake uses what it found)."""
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must survive
                LOGGER.exception("TLS reload check failed")

    def poll(self, force: bool = False) -> ServerTlsMaterial | None:
        """New material when the files changed (checked at most every ``reload_interval_s``), else ``None``."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < self.reload_interval_s:
                return None
            self._checked = now
            signature = file_signature(self._paths())
            if signature == self._signature:
                return None
            self._signature = signature
            try:
                material = self.load()
            except TlsError as error:
                self.failed_reloads += 1
                LOGGER.warning("TLS files changed but cannot be used (keeping the current certificate): %s", error)
                self._notify(False)
                return None
            if material == self.material:
                return None
            self.material = material
            self.reloads += 1
        LOGGER.info("TLS certificate reloaded for new connections: %s", material.description)
        self._notify(True)
        return material

    def _notify(self, ok: bool) -> None:
        if self.on_reload is not None:
            try:
                self.on_reload(ok)
            except Exception:  # noqa: BLE001
                LOGGER.exception("TLS reload callback failed")


def peer_identity(auth_context: Mapping[str, Sequence[bytes]]) -> dict[str, list[str]]:
    """The x509 identity of an mTLS peer from ``context.auth_context()`` (empty without a client certificate).

    Keys kept: ``x509_common_name``, ``x509_subject_alternative_name``, ``x509_subject``.
    """
    wanted = ("x509_common_name", "x509_subject_alternative_name", "x509_subject")
    return {
        key: [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in auth_context.get(key, ())]
        for key in wanted
        if auth_context.get(key)
    }


# --- the upstream channel ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """TLS towards a server: CA bundle (``None``: the system roots), optional client certificate and name override."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def paths(self) -> list[Path]:
        return [Path(p) for p in (self.ca_file, self.cert_file, self.key_file) if p]

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the current files; raise :class:`TlsError` when they are not usable."""
        root = _read(self.ca_file, "CA bundle") if self.ca_file else None
        if root is not None:
            _certificates(root, "CA bundle", self.ca_file)
        cert = key = None
        if self.cert_file or self.key_file:
            if not (self.cert_file and self.key_file):
                raise TlsError("a client certificate needs both a certificate file and a key file")
            cert = _read(self.cert_file, "client certificate")
            key = _read(self.key_file, "client private key")
            check_key_pair(cert, key, self.cert_file, self.key_file)
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name), ("grpc.default_authority", self.server_name)]


def secure_or_insecure_channel(address: str, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = ()):
    """A synchronous ``grpc`` channel, with TLS when ``tls`` is given (used by probes and start-up checks)."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.channel_options()])


class _CurrentChannelCall:
    """A multi-callable that sends each call through the owner's channel of the moment."""

    def __init__(self, owner: "ReloadingChannel", kind: str, method: str, args: tuple, kwargs: dict) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._generation = -1
        self._callable: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generation, channel = self._owner.current()
        if generation != self._generation:
            self._callable = getattr(channel, self._kind)(self._method, *self._args, **self._kwargs)
            self._generation = generation
        return self._callable(*args, **kwargs)


class ReloadingChannel:
    """A ``grpc.aio`` channel facade whose TLS files are watched; a change swaps in a new channel.

    Without ``tls`` it is a plain insecure channel that never changes. Multi-
    callables made from it (``unary_unary`` …, and so stubs) stay valid across
    swaps. The replaced channel is closed with ``swap_grace_s``: calls in
    flight on it run to completion (or their deadline) first.
    """

    def __init__(
        self,
        address: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        tls: ClientTls | None = None,
        reload_interval_s: float = 5.0,
        swap_grace_s: float = 30.0,
    ) -> None:
        self.address = address
        self.options = list(options)
        self.tls = tls
        self.reload_interval_s = reload_interval_s
        self.swap_grace_s = swap_grace_s
        self.reloads = 0
        self.failed_reloads = 0
        self._generation = 0
        self._signature = file_signature(tls.paths()) if tls else ()
        self._channel = self._build()  # raises TlsError at start-up when the files are not usable
        self._retired: dict[grpc.aio.Channel, asyncio.Task] = {}

    def _build(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.address, options=self.options)
        return grpc.aio.secure_channel(
            self.address, self.tls.credentials(), options=[*self.options, *self.tls.channel_options()]
        )

    def current(self) -> tuple[int, grpc.aio.Channel]:
        return self._generation, self._channel

    # the grpc.aio.Channel surface the sidecar and the generated stubs use
    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _CurrentChannelCall:
        return _CurrentChannelCall(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _CurrentChannelCall:
        return _CurrentChannelCall(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _CurrentChannelCall:
        return _CurrentChannelCall(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _CurrentChannelCall:
        return _CurrentChannelCall(self, "stream_stream", method, args, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def reload_if_changed(self) -> bool:
        """Swap in a new channel when the TLS files changed and are usable; True when swapped."""
        if self.tls is None:
            return False
        signature = file_signature(self.tls.paths())
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            channel = self._build()
        except TlsError as error:
            self.failed_reloads += 1
            LOGGER.warning("upstream TLS files changed but cannot be used (keeping the current channel): %s", error)
            return False
        old, self._channel = self._channel, channel
        self._generation += 1
        self.reloads += 1
        task = asyncio.ensure_future(old.close(self.swap_grace_s))
        self._retired[old] = task
        task.add_done_callback(lambda _: self._retired.pop(old, None))
        LOGGER.info("upstream TLS files changed: new channel to %s; the old one closes after its calls (<= %ss)",
                    self.address, self.swap_grace_s)
        return True

    async def watch(self) -> None:
        """Poll the TLS files every ``reload_interval_s`` (run as a task; cancelled on stop)."""
        if self.tls is None:
            return
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                self.reload_if_changed()
            except Exception:  # noqa: BLE001 - the watcher must survive
                LOGGER.exception("upstream TLS reload failed")

    async def close(self, grace: float | None = None) -> None:
        for old, task in list(self._retired.items()):
            task.cancel()
            await old.close(None)
        await self._channel.close(grace)


def server_tls_from(settings: Any, on_reload: Callable[[bool], None] | None = None) -> ServerTls | None:
    """The listener's :class:`ServerTls` from :class:`service.settings.Settings` (``None``: plaintext)."""
    if not settings.tls_cert_file:
        return None
    return ServerTls(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
        require_client_cert=settings.tls_require_client_cert,
        reload_interval_s=settings.tls_reload_interval_s,
        on_reload=on_reload,
    )


def upstream_tls_from(settings: Any) -> ClientTls | None:
    """TLS towards Triton from :class:`service.settings.Settings` (``None``: plaintext)."""
    if not settings.upstream_tls:
        return None
    return ClientTls(settings.upstream_ca_file, settings.upstream_cert_file, settings.upstream_key_file,
                     settings.upstream_server_name)
