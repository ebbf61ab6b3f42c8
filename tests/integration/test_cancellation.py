"""A client that cancels, disconnects or runs out of time stops its work at the next step."""

from __future__ import annotations

import time

import grpc
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
    for event in client.generate("a red circle", num_steps=150, seed=1):
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
