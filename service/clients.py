"""Who is calling: one :class:`~service.hooks.base.ClientIdentity` per request.

Per-client state (probing history, per-client in-flight limits) and trust
(which callers may see scores) key on it. The order is the order of how much
it can be believed: a verified mTLS subject, then a configured metadata key
(set by a trusted gateway; a client can write any value there itself), then
the TCP peer's host (all clients behind one NAT or proxy share it).

Trust (issue 13: trusted callers see scores whatever the disclosure): a caller
is trusted when its identity key is listed in ``trusted_clients`` (e.g.
``mtls:ops-dashboard``; a ``metadata:`` or ``peer:`` key is only as strong as
what sets it), or when it sends one of the ``trusted_metadata`` ``KEY=VALUE``
pairs (a shared secret header, compared in constant time).

What goes upstream (issue 20): :func:`forwarded_metadata` is the one filter
every forwarding path uses (ModelInfer, ModelStreamInfer, the pass-through
RPCs, DetectorService, the library interceptor). It drops the transport
headers the upstream channel sets itself, every ``trusted_metadata`` key (the
secret grants score disclosure; anything that logs upstream metadata would
hold it) and every ``strip_metadata`` key (internal headers of the operator's
own).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from .hooks.base import ANONYMOUS, ClientIdentity
from .settings import Settings

#: auth-context keys grpc fills from a verified client certificate, most specific first
MTLS_SUBJECT_KEYS = ("x509_common_name", "x509_subject_alternative_name")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def mtls_subject(auth_context: Mapping[str, Sequence[bytes]] | None) -> str | None:
    """The verified client certificate's subject (CN, else first SAN), or None without mTLS."""
    for key in MTLS_SUBJECT_KEYS:
        values = (auth_context or {}).get(key) or ()
        if values:
            return _text(values[0])
    return None


def peer_host(peer: str | None) -> str | None:
    """``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``; ``ipv6:[::1]:5`` -> ``ipv6:[::1]``."""
    if not peer:
        return None
    if peer.startswith(("ipv4:", "ipv6:")):
        host, sep, port = peer.rpartition(":")
        return host if sep and port.isdigit() else peer
    return peer  # unix sockets and others: the whole string


#: transport headers the upstream channel sets itself
TRANSPORT_HEADERS = frozenset({":authority", "user-agent", "content-type", "te", "grpc-timeout",
                               "grpc-accept-encoding", "grpc-encoding", "accept-encoding"})


def internal_metadata_keys(settings: Settings) -> frozenset[str]:
    """Lower-case metadata keys that never leave the process: trusted-caller secrets and ``strip_metadata``."""
    keys = {pair.partition("=")[0].strip().lower() for pair in settings.trusted_metadata}
    keys |= {key.strip().lower() for key in settings.strip_metadata}
    return frozenset(key for key in keys if key)


def forwarded_metadata(settings: Settings, metadata: Sequence[tuple[str, str | bytes]] | None
                       ) -> list[tuple[str, str | bytes]]:
    """The client's metadata as it may go upstream: no transport headers, no secret, no internal key."""
    dropped = TRANSPORT_HEADERS | internal_metadata_keys(settings)
    return [(key, value) for key, value in (metadata or ()) if key.lower() not in dropped]


def _sends_trusted_metadata(settings: Settings, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
    """Whether ``metadata`` carries one of the ``trusted_metadata`` KEY=VALUE pairs (constant-time compare)."""
    if not settings.trusted_metadata:
        return False
    found = False
    for pair in settings.trusted_metadata:
        key, _, secret = pair.partition("=")
        expected = secret.encode("utf-8")
        for name, value in metadata:
            if name.lower() == key.strip().lower():
                given = value if isinstance(value, bytes) else str(value).encode("utf-8")
                found |= hmac.compare_digest(given, expected)  # no early exit: timing says nothing
    return found


def resolve_client(settings: Settings, *, peer: str | None, auth_context: Mapping[str, Sequence[bytes]] | None,
                   metadata: Sequence[tuple[str, str | bytes]]) -> ClientIdentity:
    """Resolve the caller's identity and trust from what the transport knows (pure; see the module docstring)."""
    identity = ANONYMOUS
    subject = mtls_subject(auth_context)
    key = settings.client_id_metadata_key
    if subject:
        identity = ClientIdentity(f"mtls:{subject}", "mtls")
    elif key and (value := next((_text(v) for n, v in metadata if n.lower() == key.lower() and _text(v)), None)):
        identity = ClientIdentity(f"metadata:{value}", "metadata")
    elif host := peer_host(peer):
        identity = ClientIdentity(f"peer:{host}", "peer")
    trusted = identity.key in settings.trusted_clients or _sends_trusted_metadata(settings, metadata)
    return ClientIdentity(identity.key, identity.source, True) if trusted else identity


def client_of(context, settings: Settings) -> ClientIdentity:
    """:func:`resolve_client` for a grpc.aio servicer context."""
    try:
        auth = context.auth_context()
    except Exception:  # noqa: BLE001 - some contexts (tests, interceptors) have none
        auth = None
    try:
        peer = context.peer()
    except Exception:  # noqa: BLE001
        peer = None
    return resolve_client(settings, peer=peer, auth_context=auth, metadata=tuple(context.invocation_metadata() or ()))
