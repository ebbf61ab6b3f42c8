"""The production server (ImpastoServer over grpc.aio on TCP) in a thread of the calling
process: for tests and benchmarks that drive it through the real client and also want to look
inside (its step loop, its engine) without a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from impasto.config import ServerConfig, load_config

from .app import ImpastoServer


class ServerThread:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server: ImpastoServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)  # grpc.aio wants its server made on the loop that runs it
        try:
            self.server = ImpastoServer(self.config)
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # raised again in the caller's thread by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self._thread.start()
        self._ready.wait(timeout)
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
    """A server on a free port with load_config's defaults and `overrides`; stopped on exit."""
    server = ServerThread(load_config(None, port=0, **overrides)).start()
    try:
        yield server
    finally:
        server.stop()
