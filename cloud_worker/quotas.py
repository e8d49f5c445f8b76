"""Per-device open rate limit of a worker (issue 10: one device's flood of opens costs only it)."""

from __future__ import annotations

import time
from collections import OrderedDict


class OpenRate:
    """A token bucket per device: ``rate`` opens per second, bursts of up to ``burst``.

    ``rate`` 0 turns the limit off. At most ``max_devices`` buckets are kept (least recently
    seen dropped first), so a stream of device names cannot grow memory without bound.
    """

    def __init__(self, rate: float, burst: float, *, max_devices: int = 10_000, clock=time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self.max_devices = max_devices
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # device -> (tokens, at)

    def allow(self, device: str) -> bool:
        """Take one open from ``device``'s bucket; False when it is empty (answer ``overloaded``)."""
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, at = self._buckets.pop(device, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._buckets[device] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_devices:
            self._buckets.popitem(last=False)
        return ok
