"""Length buckets: order a look-ahead window of requests so that similar work runs together.

Requests are grouped by prompt (each template's prefix stays hot in the cache) and sorted by token
length inside each group, so a static-batch backend pads little and a continuous-batch backend sees
similar work together. The in-flight window itself is the backend's: it pulls requests from this
stream only when it has room (torch: `torch.batch_size` rows; remote engines: `scheduler.max_in_flight`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from engine.types import Request

T = TypeVar("T")


def length_buckets(window: list[T], enabled: bool = True, request: Callable[[T], Request] | None = None) -> list[T]:
    """`window` ordered by (prompt, token length); `request` finds an item's Request (items are Requests without)."""
    if not enabled:
        return window
    if request is None:
        return sorted(window, key=lambda r: (r.prompt, len(r.input_ids)))
    return sorted(window, key=lambda x: (request(x).prompt, len(request(x).input_ids)))
