"""Load: open loop (Poisson arrivals at a fixed rate) and closed loop (N clients back to back).

Every request yields one RequestRecord. Times are seconds since the run's start. A request's
latency runs from its *arrival*: the scheduled Poisson time in the open loop (so time spent
waiting for a free client slot counts, and a slow server cannot hide its queue by slowing the
load down: no coordinated omission), the send time in the closed loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..aio import AsyncImpastoClient
from ..errors import ImpastoError
from ..events import Image, Progress
from .workload import PlannedRequest, Workload


@dataclass
class RequestRecord:
    index: int
    class_name: str
    seed: int
    arrival: float
    sent: float = 0.0
    first_progress: float | None = None
    first_eta: float | None = None  # the server's ETA (s) in the first progress event
    finished: float | None = None
    num_images: int = 0
    error: str = ""  # gRPC status name; "" when the request succeeded

    @property
    def ok(self) -> bool:
        return not self.error and self.finished is not None

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def time_to_first_progress(self) -> float | None:
        return None if self.first_progress is None else self.first_progress - self.arrival


@dataclass
class LoadResult:
    mode: str  # "open_loop" or "closed_loop"
    records: list[RequestRecord]
    duration: float  # from the start until the last request ended (or the last arrival)
    rate: float | None = None  # open loop: offered requests/s
    concurrency: int | None = None  # closed loop: clients; open loop: the cap on requests in flight
    started_at: float = field(default_factory=time.time)  # wall clock, for the JSON report


def poisson_arrivals(rate: float, count: int, duration: float | None = None, seed: int = 0) -> list[float]:
    """Arrival times (s) of a Poisson process of `rate` per second: at most `count`, none after `duration`."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while len(arrivals) < count:
        t += rng.expovariate(rate)
        if duration is not None and t > duration:
            break
        arrivals.append(t)
    return arrivals


async def send_one(client: AsyncImpastoClient, planned: PlannedRequest, record: RequestRecord, clock, timeout: float | None) -> RequestRecord:
    """Send one request and fill in its record; an error is recorded, not raised."""
    cls = planned.request_class
    record.sent = clock()
    try:
        async for event in client.generate(cls.prompt, seed=planned.seed, timeout=timeout, request_id=f"bench-{planned.index}", **cls.generate_options()):
            if isinstance(event, Progress) and record.first_progress is None:
                record.first_progress = clock()
                record.first_eta = event.eta_seconds
            elif isinstance(event, Image):
                record.num_images += 1
        record.finished = clock()
    except ImpastoError as error:
        record.error = error.code.name
        record.finished = clock()
    return record


def _record(planned: PlannedRequest, arrival: float) -> RequestRecord:
    return RequestRecord(planned.index, planned.request_class.name, planned.seed, arrival)


def _clock_from_now():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


async def run_open_loop(
    client: AsyncImpastoClient,
    plan: Sequence[PlannedRequest],
    arrivals: Sequence[float],
    *,
    max_in_flight: int = 16,
    timeout: float | None = None,
    rate: float | None = None,
) -> LoadResult:
    """Send plan[i] at arrivals[i] whatever the server's state; at most `max_in_flight` at once
    (the number of clients: a request that finds all busy waits, and that wait counts)."""
    if len(arrivals) > len(plan):
        raise ValueError(f"{len(arrivals)} arrivals but only {len(plan)} planned requests")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    slots = asyncio.Semaphore(max_in_flight)
    clock = _clock_from_now()

    async def bounded(planned: PlannedRequest, arrival: float) -> RequestRecord:
        async with slots:
            return await send_one(client, planned, _record(planned, arrival), clock, timeout)

    tasks = []
    for planned, arrival in zip(plan, arrivals):
        delay = arrival - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(bounded(planned, arrival)))
    records = list(await asyncio.gather(*tasks))
    end = max([arrivals[-1] if arrivals else 0.0] + [r.finished or 0.0 for r in records])
    return LoadResult("open_loop", records, end, rate=rate, concurrency=max_in_flight)


async def run_closed_loop(
    client: AsyncImpastoClient,
    plan: Sequence[PlannedRequest],
    concurrency: int,
    *,
    duration: float | None = None,
    timeout: float | None = None,
) -> LoadResult:
    """`concurrency` clients, each sending its next request when the last one ends, until the
    plan is used up or `duration` seconds have passed (requests in flight then still finish)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    clock = _clock_from_now()
    pending = iter(plan)
    records: list[RequestRecord] = []

    async def one_client() -> None:
        for planned in pending:  # shared iterator: each planned request is taken once
            if duration is not None and clock() >= duration:
                return
            now = clock()
            records.append(await send_one(client, planned, _record(planned, now), clock, timeout))

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    records.sort(key=lambda r: r.index)
    end = max([0.0] + [r.finished or 0.0 for r in records])
    return LoadResult("closed_loop", records, end, concurrency=concurrency)


async def warm_up(client: AsyncImpastoClient, workload: Workload, per_class: int = 1, timeout: float | None = None) -> int:
    """Send each class `per_class` times, one at a time, so that first-call costs (engine load,
    allocator growth, caches) stay out of the measurement. Returns the number that failed."""
    clock = _clock_from_now()
    failed = 0
    for k in range(per_class):
        for i, cls in enumerate(workload.classes):
            planned = PlannedRequest(-1 - i, cls, seed=10**6 + k)  # seeds outside the measured runs'
            record = await send_one(client, planned, _record(planned, clock()), clock, timeout)
            failed += not record.ok
    return failed
