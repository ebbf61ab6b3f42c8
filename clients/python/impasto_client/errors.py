"""Typed errors: each carries the gRPC status code and the server's message."""

from __future__ import annotations

import grpc


class ImpastoError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgumentError(ImpastoError):
    """The request was refused; the message names the field."""


class NotFoundError(ImpastoError):
    pass


class AlreadyExistsError(ImpastoError):
    """A name or adapter is already taken; the message names the holder."""


class QueueFullError(ImpastoError):
    """The server's queue is full; retry later (with backoff)."""


class UnavailableError(ImpastoError):
    """The server is unreachable or shutting down, or the model cannot be served."""


class CancelledError(ImpastoError):
    pass


class DeadlineExceededError(ImpastoError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFullError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: UnavailableError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(error: grpc.RpcError) -> ImpastoError:
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return _BY_CODE.get(code, ImpastoError)(code, details or "")
