"""The request scheduler: decides, at every step boundary, which requests join and which share
the next UNet call. Pure Python on plain dataclasses: no tensors, no engines, no clock of its
own (callers pass `now` and measured step times), so it is unit-tested with hand-made inputs.

Policy:
- Admission: waiting requests are admitted in (effective priority, arrival) order while the
  running set holds at most `max_running_images` images (4 batches' worth by default; a
  request larger than that is admitted alone). Admitting past one batch matters: a short
  request that arrives behind long ones starts at the next step boundary instead of waiting
  at the door for a long one to finish (head-of-line blocking).
- Batching: running requests are grouped by their batch key (model, latent size, context
  length, adapter set: anything that must be equal for one engine call). Each step runs
  one group, up to `max_batch_size` images; requests at different steps, with different
  samplers, step counts and guidance scales share the call.
- Which group: shortest remaining work first. A request's remaining work is its steps left
  times the measured step time of its group; the time it has waited since its last step is
  subtracted (at half weight, WAIT_CREDIT), so long requests slow down under a stream of
  short ones but never stop. This
  is what keeps a 4-step request's latency close to its latency alone under mixed load.
- Priority first: interactive before batch (before training). A request rises one priority
  level for every `priority_aging_s` it waits, so no priority class starves.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field


# How much a second of waiting counts against a second of remaining work. Any value > 0 rules
# out starvation; 1 would make equal requests take turns step by step (every request finishes
# late), smaller values let the one ahead finish first.
WAIT_CREDIT = 0.5


@dataclass
class ScheduledRequest:
    request_id: str
    batch_key: Hashable
    num_images: int
    num_steps: int
    priority: int = 0
    arrival: float = 0.0
    steps_done: int = 0
    last_stepped: float = 0.0  # when it last ran a step (arrival until its first)

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.num_steps

    @property
    def steps_left(self) -> int:
        return self.num_steps - self.steps_done


@dataclass
class SchedulerOutput:
    admitted: list[str] = field(default_factory=list)  # joined the running set now
    batch: list[str] = field(default_factory=list)  # run one step each, in one engine call
    aborted: list[str] = field(default_factory=list)  # dropped since the last call


class RequestScheduler:
    def __init__(self, max_batch_size: int, priority_aging_s: float = 30.0, max_running_images: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if priority_aging_s <= 0:
            raise ValueError(f"priority_aging_s must be > 0, got {priority_aging_s}")
        self.max_batch_size = max_batch_size
        self.priority_aging_s = priority_aging_s
        self.max_running_images = max_running_images if max_running_images is not None else 4 * max_batch_size
        if self.max_running_images < 1:
            raise ValueError(f"max_running_images must be >= 1, got {self.max_running_images}")
        self._waiting: list[ScheduledRequest] = []
        self._running: dict[str, ScheduledRequest] = {}
        self._aborted: list[str] = []
        self._step_seconds: dict[Hashable, float] = {}  # EMA of one step's time, per batch key

    # --- inputs ---------------------------------------------------------------------------
    def add(self, request: ScheduledRequest) -> None:
        if request.request_id in self._running or any(r.request_id == request.request_id for r in self._waiting):
            raise ValueError(f"request {request.request_id} is already scheduled")
        request.last_stepped = request.arrival
        self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request; reported in the next output. False if unknown."""
        before = len(self._waiting)
        self._waiting = [r for r in self._waiting if r.request_id != request_id]
        found = len(self._waiting) != before or self._running.pop(request_id, None) is not None
        if found:
            self._aborted.append(request_id)
        return found

    def update(self, stepped: list[str], now: float, step_seconds: float | None = None) -> list[str]:
        """Record that these requests ran one step (taking step_seconds); returns those now finished."""
        finished = []
        key = None
        for request_id in stepped:
            request = self._running.get(request_id)
            if request is None:  # aborted during the step
                continue
            key = request.batch_key
            request.steps_done += 1
            request.last_stepped = now
            if request.finished:
                del self._running[request_id]
                finished.append(request_id)
        if step_seconds is not None and key is not None:
            old = self._step_seconds.get(key)
            self._step_seconds[key] = step_seconds if old is None else 0.7 * old + 0.3 * step_seconds
        return finished

    # --- decisions ------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput(aborted=self._aborted)
        self._aborted = []
        out.admitted = self._admit(now)
        out.batch = self._pick_batch(now)
        return out

    def _priority_level(self, request: ScheduledRequest, waited: float) -> int:
        return request.priority - math.floor(max(waited, 0.0) / self.priority_aging_s)

    def _waiting_order(self, now: float) -> list[ScheduledRequest]:
        return sorted(self._waiting, key=lambda r: (self._priority_level(r, now - r.arrival), r.arrival))

    def _admit(self, now: float) -> list[str]:
        admitted = []
        self._waiting = self._waiting_order(now)
        while self._waiting:
            head = self._waiting[0]
            room = self.max_running_images - sum(r.num_images for r in self._running.values())
            if head.num_images > room and self._running:
                break
            self._waiting.pop(0)
            self._running[head.request_id] = head
            admitted.append(head.request_id)
        return admitted

    def step_seconds(self, batch_key: Hashable) -> float:
        """Measured step time of a group; before any measurement, the mean of the known ones."""
        if batch_key in self._step_seconds:
            return self._step_seconds[batch_key]
        known = list(self._step_seconds.values())
        return sum(known) / len(known) if known else 1.0

    def _urgency(self, request: ScheduledRequest, now: float) -> tuple[int, float, float]:
        waited = now - request.last_stepped
        remaining = request.steps_left * self.step_seconds(request.batch_key)
        return (self._priority_level(request, waited), remaining - WAIT_CREDIT * waited, request.arrival)

    def _pick_batch(self, now: float) -> list[str]:
        runnable = [r for r in self._running.values() if not r.finished]
        if not runnable:
            return []
        order = sorted(runnable, key=lambda r: self._urgency(r, now))
        key = order[0].batch_key
        batch, images = [], 0
        for request in order:
            if request.batch_key != key:
                continue
            if batch and images + request.num_images > self.max_batch_size:
                continue
            batch.append(request.request_id)
            images += request.num_images
        return batch

    # --- views ----------------------------------------------------------------------------
    def waiting_positions(self, now: float) -> dict[str, int]:
        return {r.request_id: i for i, r in enumerate(self._waiting_order(now))}

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)
