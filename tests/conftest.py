"""Shared fixtures: a real impasto server on a free port, in a thread of the test process.

The server is the production one (ImpastoServer over grpc.aio on TCP); running it in a thread
rather than a subprocess lets tests also look at its step loop (e.g. that a cancelled request
really left the batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest

from impasto.config import ServerConfig, load_config
from impasto.rpc.app import ImpastoServer


class ServerThread:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server: ImpastoServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = ImpastoServer(self.config)
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surfaced to the test
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(120)
        if self._error:
            raise self._error
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine(self):
        return self.server.engine

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


@contextlib.contextmanager
def running_server(**overrides) -> Iterator[ServerThread]:
    config = load_config(None, port=0, **overrides)
    server = ServerThread(config).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def serving_adapters(uploads, **overrides):
    """A running server and a client, with `uploads` [(file, name, format or None)] uploaded
    first, in order: the module fixtures of the adapter tests."""
    from impasto_client import ImpastoClient

    with running_server(**overrides) as server:
        with ImpastoClient(server.target) as client:
            for path, name, format in uploads:
                client.upload_adapter(path, name, format=format)
            yield server, client


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    with running_server() as s:
        yield s


@pytest.fixture()
def client(server):
    from impasto_client import ImpastoClient

    with ImpastoClient(server.target) as c:
        yield c
