"""The synchronous client."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from .errors import from_rpc_error
from .events import Event, build_request, from_response
from .pb import image_service_pb2 as pb
from .pb import image_service_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ImpastoClient:
    def __init__(self, target: str = "localhost:50051", *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel=None):
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)],
        )
        self._stub = pb_grpc.ImageServiceStub(self._channel)

    def generate(self, prompt: str, *, timeout: float | None = None, request_id: str = "", **options) -> Iterator[Event]:
        """Yield the typed events of one request. Breaking out of the loop cancels it on the server.

        Options are GenerateRequest's fields by name: negative_prompt, model, width, height,
        num_steps, guidance_scale, sampler, seed, num_images, image_format ("png", "jpeg",
        "webp"), preview_every, priority ("interactive", "batch").
        """
        metadata = (("x-request-id", request_id),) if request_id else None
        call = self._stub.Generate(build_request(prompt, **options), timeout=timeout, metadata=metadata)
        try:
            for response in call:
                yield from_response(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op when the stream ended; stops the work when the caller broke off

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest()).models)

    def list_samplers(self) -> list[pb.SamplerInfo]:
        return list(self._call(self._stub.ListSamplers, pb.ListSamplersRequest()).samplers)

    def server_info(self) -> pb.GetServerInfoResponse:
        return self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest())

    @staticmethod
    def _call(method, request, timeout: float | None = 30.0):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ImpastoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
