"""A client that cancels, disconnects or runs out of time stops its work at the next step."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest

from impasto_client import DeadlineExceededError, Image, ImpastoClient, Progress


def wait_idle(engine, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loop = engine.step_loop
        if loop.scheduler.num_running == 0 and loop.scheduler.num_waiting == 0 and not loop._requests:
            return True
        time.sleep(0.02)
    return False


def test_breaking_out_of_the_stream_cancels_the_work(server, client):
    steps_before = server.engine.step_loop.stats.steps
    for event in client.generate("a red circle", num_steps=150, seed=1, progress_interval_ms=0):
        if isinstance(event, Progress) and event.step == 2:
            break
    assert wait_idle(server.engine)
    # It left at a step boundary, long before its 150 steps.
    assert server.engine.step_loop.stats.steps - steps_before < 100


def test_closing_the_channel_cancels_the_work(server):
    steps_before = server.engine.step_loop.stats.steps
    channel_client = ImpastoClient(server.target)
    stream = channel_client.generate("a blue square", num_steps=150, seed=2)
    for event in stream:
        if isinstance(event, Progress):
            break
    channel_client.close()  # the client goes away without cancelling explicitly
    assert wait_idle(server.engine)
    assert server.engine.step_loop.stats.steps - steps_before < 100


def test_deadline_stops_the_work(server, client):
    with pytest.raises(DeadlineExceededError):
        list(client.generate("a green triangle", num_steps=150, seed=3, timeout=0.3))
    assert wait_idle(server.engine)
    # and the server still serves
    assert any(isinstance(e, Image) for e in client.generate("a circle", num_steps=2, seed=1))


def test_many_cancelled_streams_leave_the_queue_empty(server):
    clients = [ImpastoClient(server.target) for _ in range(4)]
    try:
        for round_ in range(5):
            streams = [c.generate("a star", num_steps=100, seed=round_) for c in clients]
            for s in streams:
                next(s)  # the request is in: queued or started
            for s in streams:
                s.close()  # generator close -> call.cancel()
    finally:
        for c in clients:
            c.close()
    assert wait_idle(server.engine)


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cancel_streams(target: str, count: int, workers: int = 8) -> None:
    def work(offset: int) -> None:
        with ImpastoClient(target) as c:
            for i in range(offset, count, workers):
                stream = c.generate("a red circle", num_steps=100, seed=i)
                next(stream)  # queued or started: the server holds it now
                stream.close()  # cancel

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)


def test_cancelling_a_thousand_streams_leaves_the_queue_empty_and_memory_flat(server):
    cancel_streams(server.target, 100)  # warm-up: allocator pools, caches, channels
    assert wait_idle(server.engine)
    gc.collect()
    before = rss_bytes()
    cancel_streams(server.target, 1000)
    assert wait_idle(server.engine, timeout=60)
    gc.collect()
    grown = rss_bytes() - before
    loop = server.engine.step_loop
    assert not loop._requests and not loop._positions and server.engine._waiting == 0
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 1000 cancelled streams"
    # and the server still serves
    with ImpastoClient(server.target) as c:
        assert any(isinstance(e, Image) for e in c.generate("a circle", num_steps=2, seed=1))
