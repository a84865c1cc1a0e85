"""The interception core: transport-agnostic, one implementation for every entry point.

- :mod:`.requests`: KServe-v2 request/response helpers and :class:`RequestError`;
- :mod:`.detectors`: which detector scores which model (immutable snapshots) and hot reload;
- :mod:`.batching`: the micro-batcher that scores maps of concurrent requests in one call;
- :mod:`.policy`: what a verdict does to a response (annotate, reject, shadow) and what the caller learns;
- :mod:`.inference`: one request in, one response or verdict out (:class:`InferenceCore`);
- :mod:`.pipeline`: :func:`build_core`, the one function every entry point builds its core with.

Transports (``service/grpc/``: the proxy, the library interceptor, DetectorService)
only adapt gRPC to these plain async functions.
"""
