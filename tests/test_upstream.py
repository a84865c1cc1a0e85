"""The upstream client: a metadata lookup that fails because Triton is down must fail the request.

Found by the fault soak: a lookup error used to read as "model unknown", so a
request arriving while Triton restarted was forwarded as unprotected and, when
Triton answered a moment later, served without a score.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.core.requests import RequestError
from service.triton.server import free_port
from service.upstream import Upstream


def test_lookup_against_a_down_upstream_raises_unavailable_instead_of_unprotected():
    async def lookup():
        upstream = Upstream(f"127.0.0.1:{free_port()}", max_message_bytes=1 << 20, timeout_s=0.5)
        try:
            return await upstream.model_spec("efficientnet-lite0", "")
        finally:
            await upstream.close()

    with pytest.raises(RequestError) as raised:
        asyncio.run(lookup())
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "efficientnet-lite0" in raised.value.message and "cannot read metadata" in raised.value.message
