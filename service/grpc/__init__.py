"""gRPC transport: the KServe-v2 proxy servicer, the library interceptor, health and server assembly.

Thin by design: these modules turn gRPC calls into calls of
:class:`service.inference.InferenceCore` and its errors back into statuses.
"""
