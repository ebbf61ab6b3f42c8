"""The asyncio client: the same calls as ImpastoClient, awaitable."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from .client import DEFAULT_MAX_MESSAGE_BYTES
from .errors import from_rpc_error
from .events import Event, build_request, from_response
from .pb import image_service_pb2 as pb
from .pb import image_service_pb2_grpc as pb_grpc


class AsyncImpastoClient:
    def __init__(self, target: str = "localhost:50051", *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)],
        )
        self._stub = pb_grpc.ImageServiceStub(self._channel)

    async def generate(self, prompt: str, *, timeout: float | None = None, request_id: str = "", **options) -> AsyncIterator[Event]:
        """Yield the typed events of one request; leaving the loop early cancels it on the server."""
        metadata = (("x-request-id", request_id),) if request_id else None
        call = self._stub.Generate(build_request(prompt, **options), timeout=timeout, metadata=metadata)
        try:
            async for response in call:
                yield from_response(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._call(self._stub.ListModels, pb.ListModelsRequest())).models)

    async def list_samplers(self) -> list[pb.SamplerInfo]:
        return list((await self._call(self._stub.ListSamplers, pb.ListSamplersRequest())).samplers)

    async def server_info(self) -> pb.GetServerInfoResponse:
        return await self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest())

    @staticmethod
    async def _call(method, request, timeout: float | None = 30.0):
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncImpastoClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
