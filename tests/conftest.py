"""Shared fixtures: a real impasto server on a free port, in a thread of the test process.

The server is the production one (impasto.rpc.server_thread); running it in a thread rather
than a subprocess lets tests also look at its step loop (e.g. that a cancelled request really
left the batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from impasto.rpc.server_thread import ServerThread, running_server  # noqa: F401  (tests import them from here)


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
