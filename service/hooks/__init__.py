"""Request hooks: the stateful per-request features of the interception path, one module each.

The base class and what a hook sees live in :mod:`service.hooks.base`;
:func:`service.hooks.registry.request_hooks` builds the hooks a settings
object turns on, in order.
"""

from .base import ANONYMOUS, ClientIdentity, RequestContext, RequestHook, ScoredRequest

__all__ = ["ANONYMOUS", "ClientIdentity", "RequestContext", "RequestHook", "ScoredRequest"]
