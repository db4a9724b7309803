"""Length buckets: order a look-ahead window of requests so that similar work runs together.

Requests are grouped by prompt (each template's prefix stays hot in the cache) and sorted by token
length inside each group, so a static-batch backend pads little and a continuous-batch backend sees
similar work together. The in-flight window itself is the backend's: it pulls requests from this
stream only when it has room (torch: `torch.batch_size` rows; remote engines: `scheduler.max_in_flight`).
"""
from __future__ import annotations

from engine.types import Request


def length_buckets(window: list[Request], enabled: bool = True) -> list[Request]:
    if not enabled:
        return window
    return sorted(window, key=lambda r: (r.prompt, len(r.input_ids)))
