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
  short ones but never stop. This, with the fast lane below,
  is what keeps a 4-step request's latency close to its latency alone under mixed load.
- Priority first: interactive before batch (before training). A request rises one priority
  level for every `priority_aging_s` it waits, so no priority class starves.
- Fast lane: when the most urgent request (the batch's head) is short (`num_steps <=
  fast_lane_max_steps`), other short requests of its key join as usual, but long ones join
  only while the batch's estimated step time stays within `fast_lane_max_stretch` times that
  of the short requests alone.

Why the fast lane: shortest-remaining-work-first picks the right group, but filling the batch
up to `max_batch_size` with long requests of the same key makes every step of the short one a
full-batch step: head-of-line blocking inside the batch. A step costs roughly a + b * images
with a large fixed part a (weights read once per call, per-call overheads), which is what
makes batching valuable, so the lane does not simply run short requests alone: it is limited
to short requests, and long ones still ride along while they stretch the step by at most the
bounded factor. The cost is throughput: a step that leaves long requests out pays a again for
them later, so under mixed load images/s drops somewhat in exchange for the short requests'
latency; long requests are only slowed, never stopped (they are the head when no short
request is more urgent, and WAIT_CREDIT makes them so eventually), and when they are the
head the batch fills as before. The estimate is per batch key and batch size in images (not
UNet rows: a CFG request counts as one image): the measured EMA of that size, else a
least-squares line through the measured sizes (two or more), else unknown, and an unknown
cost adds no long request (a single point scaled linearly would ignore a); the sizes get
measured when long requests run as head. `fast_lane_max_steps = 0` turns the lane off.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field


# How much a second of waiting counts against a second of remaining work. Any value > 0 rules
# out starvation; 1 would make equal requests take turns step by step (every request finishes
# late), smaller values let the one ahead finish first.
WAIT_CREDIT = 0.5

# Batch keys whose per-size step times are kept (a LoRA schedule makes one key per request).
MAX_COST_KEYS = 256


def _make_room(per_key: dict) -> None:
    """Forget the oldest key of a per-batch-key table at its bound: a LoRA weight schedule makes
    one key per request, so an unbounded table would grow for the server's whole life."""
    if len(per_key) >= MAX_COST_KEYS:
        del per_key[next(iter(per_key))]


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
    def __init__(
        self,
        max_batch_size: int,
        priority_aging_s: float = 30.0,
        max_running_images: int | None = None,
        fast_lane_max_steps: int = 8,
        fast_lane_max_stretch: float = 1.5,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if priority_aging_s <= 0:
            raise ValueError(f"priority_aging_s must be > 0, got {priority_aging_s}")
        if fast_lane_max_steps < 0:
            raise ValueError(f"fast_lane_max_steps must be >= 0, got {fast_lane_max_steps}")
        if not fast_lane_max_stretch >= 1:
            raise ValueError(f"fast_lane_max_stretch must be >= 1, got {fast_lane_max_stretch}")
        self.max_batch_size = max_batch_size
        self.priority_aging_s = priority_aging_s
        self.fast_lane_max_steps = fast_lane_max_steps
        self.fast_lane_max_stretch = fast_lane_max_stretch
        self.max_running_images = max_running_images if max_running_images is not None else 4 * max_batch_size
        if self.max_running_images < 1:
            raise ValueError(f"max_running_images must be >= 1, got {self.max_running_images}")
        self._waiting: list[ScheduledRequest] = []
        self._running: dict[str, ScheduledRequest] = {}
        self._aborted: list[str] = []
        self._step_seconds: dict[Hashable, float] = {}  # EMA of one step's time, per batch key
        # EMA of one step's time per batch key and batch size in images (the fast lane's cost model)
        self._size_seconds: dict[Hashable, dict[int, float]] = {}

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
        images, sized = 0, True  # the batch's size is known only if every request still is
        for request_id in stepped:
            request = self._running.get(request_id)
            if request is None:  # aborted during the step
                sized = False
                continue
            key = request.batch_key
            images += request.num_images
            request.steps_done += 1
            request.last_stepped = now
            if request.finished:
                del self._running[request_id]
                finished.append(request_id)
        if step_seconds is not None and key is not None:
            old = self._step_seconds.get(key)
            if old is None:
                _make_room(self._step_seconds)
            self._step_seconds[key] = step_seconds if old is None else 0.7 * old + 0.3 * step_seconds
            if sized:
                self._record_size_seconds(key, images, step_seconds)
        return finished

    def _record_size_seconds(self, key: Hashable, images: int, step_seconds: float) -> None:
        sizes = self._size_seconds.get(key)
        if sizes is None:
            _make_room(self._size_seconds)
            sizes = self._size_seconds[key] = {}
        old = sizes.get(images)
        sizes[images] = step_seconds if old is None else 0.7 * old + 0.3 * step_seconds

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
        group = [r for r in order if r.batch_key == key]
        if not self._is_short(order[0]):
            return self._fill(group)[0]
        # Fast lane: short requests as usual, then long ones while the step stretches little.
        batch, images = self._fill([r for r in group if self._is_short(r)])
        base = self.estimated_step_seconds(key, images)
        if base is None:  # cost unknown: no long request (they run, and get measured, as head)
            return batch
        limit = self.fast_lane_max_stretch * base
        for request in group:
            if self._is_short(request) or images + request.num_images > self.max_batch_size:
                continue
            cost = self.estimated_step_seconds(key, images + request.num_images)
            if cost is None or cost > limit:
                continue
            batch.append(request.request_id)
            images += request.num_images
        return batch

    def _fill(self, requests: list[ScheduledRequest]) -> tuple[list[str], int]:
        """The requests, in order, that fit max_batch_size (the first always); and their images."""
        batch, images = [], 0
        for request in requests:
            if batch and images + request.num_images > self.max_batch_size:
                continue
            batch.append(request.request_id)
            images += request.num_images
        return batch, images

    def _is_short(self, request: ScheduledRequest) -> bool:
        return 0 < self.fast_lane_max_steps and request.num_steps <= self.fast_lane_max_steps

    def estimated_step_seconds(self, batch_key: Hashable, images: int) -> float | None:
        """One step's time for this many images of a group: measured, else from a least-squares
        line through its measured sizes (two or more), else None (unknown)."""
        sizes = self._size_seconds.get(batch_key, {})
        if images in sizes:
            return sizes[images]
        if len(sizes) < 2:
            return None
        mean_n = sum(sizes) / len(sizes)
        mean_t = sum(sizes.values()) / len(sizes)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in sizes.items()) / sum((n - mean_n) ** 2 for n in sizes)
        estimate = mean_t + slope * (images - mean_n)
        return estimate if estimate > 0 else None

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
