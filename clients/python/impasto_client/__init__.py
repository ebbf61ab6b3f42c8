"""Python client for the impasto image server (grpcio + protobuf only).

    from impasto_client import ImpastoClient

    with ImpastoClient("localhost:50051") as client:
        for event in client.generate("a red circle on a white background", seed=1):
            if isinstance(event, Image):
                open("out.png", "wb").write(event.data)
"""

from .aio import AsyncImpastoClient
from .client import ImpastoClient
from .errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    ImpastoError,
    InvalidArgumentError,
    NotFoundError,
    QueueFullError,
    UnavailableError,
)
from .events import Done, Image, Progress, Queued, Started

__all__ = [
    "AlreadyExistsError",
    "AsyncImpastoClient",
    "CancelledError",
    "DeadlineExceededError",
    "Done",
    "Image",
    "ImpastoClient",
    "ImpastoError",
    "InvalidArgumentError",
    "NotFoundError",
    "Progress",
    "QueueFullError",
    "Queued",
    "Started",
    "UnavailableError",
]
