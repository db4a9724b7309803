"""Length buckets: order a look-ahead window of requests so that similar work runs together.

Requests are grouped by prompt (each template's prefix stays hot in the cache) and sorted by token
length inside each group, so a static-batch backend pads little and a continuous-batch backend sees
similar work together.

Document-major (render.layout = "document_first"): a document's requests share its prefix, so they go
together, back to back, and the documents are ordered by length: the window is sorted by the shared prefix's
length alone, and the sort is stable, so the prompts of one document, which the producer emits together, stay
adjacent. The prompts' instructions differ by a few tokens, so the lengths stay bucketed (measured in
benchmarks/prefill_sharing.py: the padding of batches). The in-flight window itself is the backend's: it
pulls requests from this stream only when it has room (torch: `torch.batch_size` rows; remote engines:
`scheduler.max_in_flight`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from engine.types import Request

T = TypeVar("T")


def length_buckets(window: list[T], enabled: bool = True, request: Callable[[T], Request] | None = None,
                   document_major: bool = False) -> list[T]:
    """`window` ordered by (prompt, token length), or document-major by the length of the shared document prefix
    (module doc); `request` finds an item's Request (items are Requests without)."""
    if not enabled:
        return window
    request = request or (lambda r: r)
    if document_major:
        return sorted(window, key=lambda x: request(x).prefix_len)
    return sorted(window, key=lambda x: (request(x).prompt, len(request(x).input_ids)))
