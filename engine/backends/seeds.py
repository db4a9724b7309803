"""Per-request seeds: each backend that samples with `sampling.seed` set derives one seed per request from
it, the same way (torch: each row's own generator; vllm, sglang, http: the request's seed field), so a
request samples the same tokens whatever else shares its batch."""
from __future__ import annotations


def request_seed(seed: int, key: int) -> int:
    """A per-request seed derived from the run's `sampling.seed` (sent only when the user sets one)."""
    return (seed * 1_000_003 + key) % (2 ** 31)
