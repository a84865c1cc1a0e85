"""gRPC transport: the KServe-v2 proxy, the library interceptor, the DetectorService, streams, server assembly.

Thin by design: these modules turn gRPC calls into calls of
:class:`service.core.inference.InferenceCore` (built by
:func:`service.core.pipeline.build_core`) and its errors back into statuses;
:mod:`.streams` is the one ordered, bounded, cancellable stream loop they share.
"""
