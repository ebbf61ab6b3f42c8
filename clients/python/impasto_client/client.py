"""The synchronous client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import grpc.experimental

from .errors import from_rpc_error
from .events import Event, build_request, from_response
from .pb import adapter_service_pb2 as adapter_pb
from .pb import adapter_service_pb2_grpc as adapter_pb_grpc
from .pb import image_service_pb2 as pb
from .pb import image_service_pb2_grpc as pb_grpc
from .pb import training_service_pb2 as training_pb
from .pb import training_service_pb2_grpc as training_pb_grpc
from .training import JobStatus, TrainingEvent, dataset_requests, from_watch_response, job_status, start_request

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
UPLOAD_CHUNK_BYTES = 1024 * 1024
ADAPTER_FORMATS = {
    None: adapter_pb.ADAPTER_FORMAT_UNSPECIFIED,
    "kohya": adapter_pb.ADAPTER_FORMAT_KOHYA,
    "diffusers": adapter_pb.ADAPTER_FORMAT_DIFFUSERS,
    "peft": adapter_pb.ADAPTER_FORMAT_PEFT,
    "cloneofsimo": adapter_pb.ADAPTER_FORMAT_CLONEOFSIMO,
    "embedding": adapter_pb.ADAPTER_FORMAT_EMBEDDING,
}


T = TypeVar("T")

# A drained call has at most three events left (initial metadata, a message, the status).
_MAX_EVENTS_AFTER_CANCEL = 8


def _single_threaded_streams() -> list[tuple[str, int]]:
    """The channel option that runs each server-streaming call on the caller's thread.

    grpc's default starts a "channel spin" thread for each call and hands every message from
    it to the caller: a thread start per Generate and a thread switch per event, about 15% of
    this client's CPU per default Generate (measured A/B against one server). Single-threaded
    calls release their C resources only once their last event is read, so a stream left early
    must be drained after its cancel (`_release`); that needs the call's `_consume_next_event`,
    which is grpc-internal, so without it we keep grpc's default.
    """
    from grpc import _channel

    if not hasattr(getattr(_channel, "_SingleThreadedRendezvous", None), "_consume_next_event"):
        return []
    return [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]


def _release(call) -> None:
    """Read what is left of a cancelled single-threaded call, so grpc frees it (else ~17 KB leak
    per stream left early). A no-op for an ended stream and for grpc's multi-threaded calls."""
    consume = getattr(call, "_consume_next_event", None)
    state = getattr(call, "_state", None)
    if consume is None or state is None:
        return
    for _ in range(_MAX_EVENTS_AFTER_CANCEL):  # cancel completes every pending op at once
        if not state.due:
            return
        consume()


def upload_requests(path_or_bytes, name: str, format: str | None = None, model: str = "") -> Iterator[adapter_pb.UploadAdapterRequest]:
    """The UploadAdapter stream: the header, then the file in 1 MiB chunks (read lazily from a path)."""
    if format not in ADAPTER_FORMATS:
        raise ValueError(f"format must be one of {sorted(f for f in ADAPTER_FORMATS if f)} or None, got {format!r}")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        size = len(data)
        chunks = (data[i : i + UPLOAD_CHUNK_BYTES] for i in range(0, size, UPLOAD_CHUNK_BYTES))
    else:
        import os

        size = os.path.getsize(path_or_bytes)

        def read():
            with open(path_or_bytes, "rb") as f:
                while chunk := f.read(UPLOAD_CHUNK_BYTES):
                    yield chunk

        chunks = read()
    header = adapter_pb.UploadAdapterHeader(name=name, format=ADAPTER_FORMATS[format], model=model, size_bytes=size)
    yield adapter_pb.UploadAdapterRequest(header=header)
    for chunk in chunks:
        yield adapter_pb.UploadAdapterRequest(chunk=chunk)


class ImpastoClient:
    def __init__(self, target: str = "localhost:50051", *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel=None):
        self._closed = False
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                *_single_threaded_streams(),
            ],
        )
        self._stub = pb_grpc.ImageServiceStub(self._channel)
        self._adapters = adapter_pb_grpc.AdapterServiceStub(self._channel)
        self._training = training_pb_grpc.TrainingServiceStub(self._channel)

    def generate(self, prompt: str, *, timeout: float | None = None, request_id: str = "", **options) -> Iterator[Event]:
        """Yield the typed events of one request. Breaking out of the loop cancels it on the server.

        Options are GenerateRequest's fields by name: negative_prompt, model, width, height,
        num_steps, guidance_scale, sampler, seed, num_images, image_format ("png", "jpeg",
        "webp"), preview_every, progress_interval_ms (unset: the server's 100 ms; 0: every step),
        priority ("interactive", "batch"), adapters ([(name or id,
        weight)], the weight a float or a schedule string like "0@0,1@0.5").
        """
        metadata = (("x-request-id", request_id),) if request_id else None
        call = self._stub.Generate(build_request(prompt, **options), timeout=timeout, metadata=metadata)
        yield from self._stream(call, from_response)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest()).models)

    def list_samplers(self) -> list[pb.SamplerInfo]:
        return list(self._call(self._stub.ListSamplers, pb.ListSamplersRequest()).samplers)

    def server_info(self) -> pb.GetServerInfoResponse:
        return self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest())

    # --- adapters ---
    def upload_adapter(self, path_or_bytes, name: str, *, format: str | None = None, model: str = "", timeout: float | None = 300.0) -> adapter_pb.AdapterInfo:
        """Upload a LoRA safetensors file (a path or its bytes) under a unique name; returns its AdapterInfo."""
        return self._call(self._adapters.UploadAdapter, upload_requests(path_or_bytes, name, format, model), timeout=timeout).adapter

    def list_adapters(self) -> list[adapter_pb.AdapterInfo]:
        return list(self._call(self._adapters.ListAdapters, adapter_pb.ListAdaptersRequest()).adapters)

    def delete_adapter(self, id_or_name: str) -> adapter_pb.AdapterInfo:
        return self._call(self._adapters.DeleteAdapter, adapter_pb.DeleteAdapterRequest(adapter=id_or_name)).adapter

    # --- training ---
    def upload_dataset(self, name: str, source, *, timeout: float | None = 600.0) -> training_pb.UploadDatasetResponse:
        """Upload a folder (or {relative path: bytes}) as dataset `name` under the server's data dir."""
        return self._call(self._training.UploadDataset, dataset_requests(name, source), timeout=timeout)

    def start_training(self, method: str, **options) -> str:
        """Queue a job; returns its id. Options are training.start_request's keywords (dataset,
        adapter_name, instance_prompt, num_steps, rank, class_prompt, token, ...)."""
        return self._call(self._training.StartTraining, start_request(method, **options)).job_id

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[TrainingEvent]:
        """The job's events until it ends: JobStatus first, then TrainingProgress, TrainingSample,
        JobResumed, and a last JobStatus with a final state."""
        call = self._training.WatchJob(training_pb.WatchJobRequest(job_id=job_id), timeout=timeout)
        yield from self._stream(call, from_watch_response)

    def get_job(self, job_id: str) -> JobStatus:
        return job_status(self._call(self._training.GetJob, training_pb.GetJobRequest(job_id=job_id)).job)

    def list_jobs(self) -> list[JobStatus]:
        return [job_status(j) for j in self._call(self._training.ListJobs, training_pb.ListJobsRequest()).jobs]

    def cancel_job(self, job_id: str) -> JobStatus:
        return job_status(self._call(self._training.CancelJob, training_pb.CancelJobRequest(job_id=job_id)).job)

    def download_job_output(self, job_id: str, output: str = "kohya", *, timeout: float | None = 300.0) -> tuple[str, bytes]:
        """(file name, bytes) of a finished job's output ("kohya", "diffusers", "embeddings", "peft_unet", ...)."""
        name, parts = "", []
        call = self._training.DownloadJobOutput(training_pb.DownloadJobOutputRequest(job_id=job_id, output=output), timeout=timeout)
        for response in self._stream(call, lambda r: r):
            name = name or response.file_name
            parts.append(response.chunk)
        return name, b"".join(parts)

    def _stream(self, call, convert: Callable[[object], T]) -> Iterator[T]:
        try:
            for response in call:
                yield convert(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            # After close() the channel has cancelled its calls, and its C core may be gone.
            if not self._closed:
                call.cancel()  # a no-op when the stream ended; stops the work when the caller broke off
                _release(call)

    @staticmethod
    def _call(method, request, timeout: float | None = 30.0):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> "ImpastoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
