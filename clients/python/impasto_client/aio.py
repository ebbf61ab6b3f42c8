"""The asyncio client: the same calls as ImpastoClient, awaitable."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from .client import DEFAULT_MAX_MESSAGE_BYTES, upload_requests
from .errors import from_rpc_error
from .events import Event, build_request, from_response
from .pb import adapter_service_pb2 as adapter_pb
from .pb import adapter_service_pb2_grpc as adapter_pb_grpc
from .pb import image_service_pb2 as pb
from .pb import image_service_pb2_grpc as pb_grpc
from .pb import training_service_pb2 as training_pb
from .pb import training_service_pb2_grpc as training_pb_grpc
from .training import JobStatus, TrainingEvent, dataset_requests, from_watch_response, job_status, start_request


class AsyncImpastoClient:
    def __init__(self, target: str = "localhost:50051", *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)],
        )
        self._stub = pb_grpc.ImageServiceStub(self._channel)
        self._adapters = adapter_pb_grpc.AdapterServiceStub(self._channel)
        self._training = training_pb_grpc.TrainingServiceStub(self._channel)

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

    # --- adapters ---
    async def upload_adapter(self, path_or_bytes, name: str, *, format: str | None = None, model: str = "", timeout: float | None = 300.0) -> adapter_pb.AdapterInfo:
        """Upload a LoRA safetensors file (a path or its bytes) under a unique name; returns its AdapterInfo."""
        # grpc.aio accepts a plain iterator for a client stream; the file is read as it is sent.
        return (await self._call(self._adapters.UploadAdapter, upload_requests(path_or_bytes, name, format, model), timeout=timeout)).adapter

    async def list_adapters(self) -> list[adapter_pb.AdapterInfo]:
        return list((await self._call(self._adapters.ListAdapters, adapter_pb.ListAdaptersRequest())).adapters)

    async def delete_adapter(self, id_or_name: str) -> adapter_pb.AdapterInfo:
        return (await self._call(self._adapters.DeleteAdapter, adapter_pb.DeleteAdapterRequest(adapter=id_or_name))).adapter

    # --- training ---
    async def upload_dataset(self, name: str, source, *, timeout: float | None = 600.0) -> training_pb.UploadDatasetResponse:
        """Upload a folder (or {relative path: bytes}) as dataset `name` under the server's data dir."""
        return await self._call(self._training.UploadDataset, dataset_requests(name, source), timeout=timeout)

    async def start_training(self, method: str, **options) -> str:
        """Queue a job; returns its id (options as ImpastoClient.start_training)."""
        return (await self._call(self._training.StartTraining, start_request(method, **options))).job_id

    async def watch_job(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[TrainingEvent]:
        call = self._training.WatchJob(training_pb.WatchJobRequest(job_id=job_id), timeout=timeout)
        try:
            async for response in call:
                yield from_watch_response(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def get_job(self, job_id: str) -> JobStatus:
        return job_status((await self._call(self._training.GetJob, training_pb.GetJobRequest(job_id=job_id))).job)

    async def list_jobs(self) -> list[JobStatus]:
        return [job_status(j) for j in (await self._call(self._training.ListJobs, training_pb.ListJobsRequest())).jobs]

    async def cancel_job(self, job_id: str) -> JobStatus:
        return job_status((await self._call(self._training.CancelJob, training_pb.CancelJobRequest(job_id=job_id))).job)

    async def download_job_output(self, job_id: str, output: str = "kohya", *, timeout: float | None = 300.0) -> tuple[str, bytes]:
        name, parts = "", []
        try:
            async for response in self._training.DownloadJobOutput(training_pb.DownloadJobOutputRequest(job_id=job_id, output=output), timeout=timeout):
                name = name or response.file_name
                parts.append(response.chunk)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return name, b"".join(parts)

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
