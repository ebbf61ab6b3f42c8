"""Errors the core raises; the rpc layer maps each class to one gRPC status in one place."""


class InvalidArgument(ValueError):
    """Bad input. The message names the field, e.g. "width: must be a multiple of 8"."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(LookupError):
    """A named thing (model, adapter) does not exist."""


class Unavailable(RuntimeError):
    """A model or backend exists but cannot be used here; the message says why."""


class QueueFull(RuntimeError):
    """Backpressure: the queue is at its limit."""


class Unimplemented(NotImplementedError):
    """A field the API reserves but this server does not serve yet."""


class AlreadyExists(RuntimeError):
    """A name or content is already taken; the message names the holder."""
