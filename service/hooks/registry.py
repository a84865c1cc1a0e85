"""Which request hooks a settings object turns on, and in which order."""

from __future__ import annotations

from ..metrics import SidecarMetrics
from ..settings import Settings
from .base import RequestHook


def request_hooks(settings: Settings, metrics: SidecarMetrics) -> list[RequestHook]:
    """The stateful per-request features in force, each one module of ``service/hooks/``.

    Order matters: admission hooks run in this order (cheap refusals first) and
    a later hook's response parameters overwrite an earlier one's.
    """
    from .capture import capture_hook_from_settings
    from .probing import probing_hook_from_settings
    from .shedding import shedding_hook_from_settings
    from .traffic import traffic_hook

    candidates = [
        shedding_hook_from_settings(settings, metrics),  # load shedding first: the cheapest refusal
        capture_hook_from_settings(settings, metrics),  # ring of flagged requests (opt-in)
        probing_hook_from_settings(settings, metrics),  # per-client probing detection
        traffic_hook(settings, metrics),  # traffic score sketch
    ]
    return [hook for hook in candidates if hook is not None]
