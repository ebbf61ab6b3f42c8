"""Map exceptions to gRPC status codes, in one place for every RPC.

Servicers raise the core's exceptions (or let them pass through); this interceptor turns
each class into its status code with the exception's message, and logs anything unexpected
as INTERNAL without leaking a traceback to the client.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from impasto.core.errors import AlreadyExists, InvalidArgument, NotFound, QueueFull, Unavailable, Unimplemented

log = logging.getLogger(__name__)

STATUS_BY_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return code, str(exc)
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException):
    code, message = status_for(exc)
    await context.abort(code, message)


def _wrap_unary(behavior):
    async def wrapper(request, context):
        try:
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


def _wrap_stream(behavior):
    async def wrapper(request, context):
        try:
            async for response in behavior(request, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


class ErrorsInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        return handler
