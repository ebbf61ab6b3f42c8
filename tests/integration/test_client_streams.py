"""The sync client's server-streaming calls: on the caller's thread, and released when left early.

Against a stand-in ImageService (plain grpc, no model) that streams progress until cancelled,
so each stream costs milliseconds and only the client's own resources are measured.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from concurrent import futures

import grpc
import pytest

from impasto_client import ImpastoClient, Progress
from impasto_client.pb import image_service_pb2 as pb
from impasto_client.pb import image_service_pb2_grpc as pb_grpc


class EndlessProgress(pb_grpc.ImageServiceServicer):
    def __init__(self):
        self.started = 0
        self.ended = 0
        self._lock = threading.Lock()

    def _count_end(self) -> None:
        with self._lock:
            self.ended += 1

    def Generate(self, request, context):
        with self._lock:
            self.started += 1
        context.add_callback(self._count_end)
        step = 0
        while context.is_active():
            step += 1
            yield pb.GenerateResponse(request_id="r", progress=pb.ProgressEvent(step=step, num_steps=10**6))
            time.sleep(0.001)


@pytest.fixture(scope="module")
def endless():
    servicer = EndlessProgress()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ImageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def leave_early(client: ImpastoClient, count: int) -> None:
    for _ in range(count):
        for event in client.generate("a red circle"):
            assert isinstance(event, Progress)
            break


def test_a_stream_runs_on_the_callers_thread(endless):
    # grpc's default would start a "channel spin" thread per call and hand each event over.
    _, target = endless
    with ImpastoClient(target) as client:
        leave_early(client, 2)  # the channel's own threads are up
        time.sleep(0.5)  # and those of calls that ended are gone
        before = threading.active_count()
        for event in client.generate("a red circle"):
            assert threading.active_count() == before
            if event.step == 20:
                break


def test_streams_left_early_are_cancelled_and_released(endless):
    servicer, target = endless
    with ImpastoClient(target) as client:
        leave_early(client, 200)  # warm-up: allocator pools, the connection
        gc.collect()
        settle = time.monotonic() + 10  # cancels reach the server asynchronously: let earlier ones land
        while servicer.ended < servicer.started and time.monotonic() < settle:
            time.sleep(0.01)
        ended, before = servicer.ended, rss_bytes()
        leave_early(client, 1500)
        gc.collect()
        grown = rss_bytes() - before
    deadline = time.monotonic() + 10
    while servicer.ended - ended < 1500 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert servicer.ended - ended == 1500, "every stream left early reaches the server as a cancel"
    # An undrained single-threaded call keeps ~17 KB of C memory: 1500 of them, ~25 MiB.
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 1500 streams left early"
