"""Which progress events of a Generate stream go on the wire.

The step loop reports every step (its ETA learns from each); a client drawing a progress bar
needs a few updates a second. Every event sent costs a protobuf message, a write and wake-ups
on both sides (~0.1 ms in all, measured by benchmarks/grpc_overhead.py): at 20 steps of ~10 ms
that was 3-4% of the request. So the servicer sends progress at most once per interval, and
always the first step (time to first progress is what a user sees), the last, and any step
carrying a preview the client asked for.
"""

from __future__ import annotations

import time

from impasto.core.spec import Progress

DEFAULT_PROGRESS_INTERVAL_MS = 100


class ProgressPacer:
    def __init__(self, interval_ms: int | None, clock=time.monotonic):
        self.interval_s = (DEFAULT_PROGRESS_INTERVAL_MS if interval_ms is None else interval_ms) / 1000.0
        self.clock = clock
        self._last_sent: float | None = None

    def send(self, event: object) -> bool:
        """False for a progress event to drop; every other event is sent."""
        if not isinstance(event, Progress):
            return True
        now = self.clock()
        due = self._last_sent is None or now - self._last_sent >= self.interval_s
        if due or event.step >= event.num_steps or event.preview:  # the first is always due
            self._last_sent = now
            return True
        return False
