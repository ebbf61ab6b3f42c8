"""The request scheduler: decides, at every step boundary, which requests join and which share
the next UNet call. Pure Python on plain dataclasses: no tensors, no engines, no clock of its
own (callers pass `now`), so it is unit-tested with hand-made inputs.

Policy:
- Admission: waiting requests are admitted in (priority, arrival) order while the running
  set has room for their images (`max_batch_size` images). A request larger than that is
  admitted alone. So with `max_batch_size=1` the server runs one request at a time, FCFS.
- Aging: a request's priority rises by one level for every `priority_aging_s` it waits
  (in the queue, or in the running set since its last step), so batch work is never starved
  by a steady stream of interactive work.
- Batching: running requests are grouped by their batch key (model, latent size, context
  length, adapter set: anything that must be equal for one engine call). The group of the
  request that has waited longest since its last step goes next, filled in (priority,
  waiting time) order up to `max_batch_size` images. Requests at different steps, with
  different samplers, step counts and guidance scales share a call.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


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


@dataclass
class SchedulerOutput:
    admitted: list[str] = field(default_factory=list)  # joined the running set now
    batch: list[str] = field(default_factory=list)  # run one step each, in one engine call
    aborted: list[str] = field(default_factory=list)  # dropped since the last call


class RequestScheduler:
    def __init__(self, max_batch_size: int, priority_aging_s: float = 30.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if priority_aging_s <= 0:
            raise ValueError(f"priority_aging_s must be > 0, got {priority_aging_s}")
        self.max_batch_size = max_batch_size
        self.priority_aging_s = priority_aging_s
        self._waiting: list[ScheduledRequest] = []
        self._running: dict[str, ScheduledRequest] = {}
        self._aborted: list[str] = []

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

    def update(self, stepped: list[str], now: float) -> list[str]:
        """Record that these requests ran one step; returns those that are now finished."""
        finished = []
        for request_id in stepped:
            request = self._running.get(request_id)
            if request is None:  # aborted during the step
                continue
            request.steps_done += 1
            request.last_stepped = now
            if request.finished:
                del self._running[request_id]
                finished.append(request_id)
        return finished

    # --- decisions ------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput(aborted=self._aborted)
        self._aborted = []
        out.admitted = self._admit(now)
        out.batch = self._pick_batch(now)
        return out

    def _effective_priority(self, priority: int, waited: float) -> float:
        return priority - waited / self.priority_aging_s

    def _waiting_order(self, now: float) -> list[ScheduledRequest]:
        return sorted(self._waiting, key=lambda r: (self._effective_priority(r.priority, now - r.arrival), r.arrival))

    def _admit(self, now: float) -> list[str]:
        admitted = []
        self._waiting = self._waiting_order(now)
        while self._waiting:
            head = self._waiting[0]
            room = self.max_batch_size - sum(r.num_images for r in self._running.values())
            if head.num_images > room and self._running:
                break
            self._waiting.pop(0)
            self._running[head.request_id] = head
            admitted.append(head.request_id)
        return admitted

    def _pick_batch(self, now: float) -> list[str]:
        runnable = [r for r in self._running.values() if not r.finished]
        if not runnable:
            return []
        order = sorted(runnable, key=lambda r: (self._effective_priority(r.priority, now - r.last_stepped), r.last_stepped, r.arrival))
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
