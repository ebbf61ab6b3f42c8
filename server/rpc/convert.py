"""protobuf <-> core dataclasses. The only place that knows both."""

from __future__ import annotations

from impasto.core import spec as core
from impasto.core.errors import InvalidArgument

from .pb import adapter_service_pb2 as adapter_pb
from .pb import image_service_pb2 as pb

_FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: core.ImageFormat.PNG,
    pb.IMAGE_FORMAT_PNG: core.ImageFormat.PNG,
    pb.IMAGE_FORMAT_JPEG: core.ImageFormat.JPEG,
    pb.IMAGE_FORMAT_WEBP: core.ImageFormat.WEBP,
}
_PRIORITIES = {
    pb.PRIORITY_UNSPECIFIED: core.Priority.INTERACTIVE,
    pb.PRIORITY_INTERACTIVE: core.Priority.INTERACTIVE,
    pb.PRIORITY_BATCH: core.Priority.BATCH,
}


def generation_spec(request: pb.GenerateRequest) -> core.GenerationSpec:
    if request.image_format not in _FORMATS:
        raise InvalidArgument("image_format", f"unknown value {request.image_format}")
    if request.priority not in _PRIORITIES:
        raise InvalidArgument("priority", f"unknown value {request.priority}")
    return core.GenerationSpec(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        model=request.model,
        width=request.width,
        height=request.height,
        num_steps=request.num_steps if request.HasField("num_steps") else None,
        guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
        sampler=request.sampler,
        seed=request.seed if request.HasField("seed") else None,
        num_images=request.num_images,
        image_format=_FORMATS[request.image_format],
        preview_every=request.preview_every,
        adapters=tuple(core.AdapterWeight(a.adapter, a.weight, a.weight_schedule) for a in request.adapters),
        priority=_PRIORITIES[request.priority],
    )


def generate_response(request_id: str, event) -> pb.GenerateResponse:
    if isinstance(event, core.Queued):
        return pb.GenerateResponse(request_id=request_id, queued=pb.QueuedEvent(position=event.position))
    if isinstance(event, core.Started):
        s = event.spec
        return pb.GenerateResponse(
            request_id=request_id,
            started=pb.StartedEvent(
                model=s.model_name,
                sampler=s.sampler,
                width=s.width,
                height=s.height,
                num_steps=event.num_denoiser_steps,
                guidance_scale=s.guidance_scale,
                seed=s.seed,
                num_images=s.num_images,
            ),
        )
    if isinstance(event, core.Progress):
        return pb.GenerateResponse(
            request_id=request_id,
            progress=pb.ProgressEvent(
                step=event.step,
                num_steps=event.num_steps,
                eta_seconds=event.eta_seconds,
                preview=event.preview,
                preview_mime_type=event.preview_mime_type,
            ),
        )
    if isinstance(event, core.ImageReady):
        return pb.GenerateResponse(
            request_id=request_id,
            image=pb.ImageEvent(
                index=event.index, data=event.data, mime_type=event.mime_type, seed=event.seed, infotext=event.infotext
            ),
        )
    if isinstance(event, core.Done):
        return pb.GenerateResponse(
            request_id=request_id, done=pb.DoneEvent(num_images=event.num_images, elapsed_seconds=event.elapsed_seconds)
        )
    raise TypeError(f"no protobuf form for event {event!r}")


def model_info(entry) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=entry.name,
        hash=entry.short_hash,
        sha256=entry.sha256,
        is_default=entry.is_default,
        default_width=entry.default_width,
        default_height=entry.default_height,
        available=entry.available,
        unavailable_reason=entry.unavailable_reason,
    )


def sampler_info(sampler) -> pb.SamplerInfo:
    return pb.SamplerInfo(name=sampler.name, display_name=sampler.display_name, noise_scheduler=sampler.noise_scheduler)


def server_info(info: dict) -> pb.GetServerInfoResponse:
    limits = info["limits"]
    return pb.GetServerInfoResponse(
        version=info["version"],
        default_model=info["default_model"],
        backends=[pb.BackendInfo(name=b.name, available=b.available, reason=b.reason, version=b.version) for b in info["backends"]],
        limits=pb.Limits(
            max_pixels=limits.max_pixels,
            max_steps=limits.max_steps,
            max_images_per_request=limits.max_images_per_request,
            max_queue_length=limits.max_queue_length,
            max_message_bytes=limits.max_message_bytes,
            max_batch_size=info["max_batch_size"],
            max_adapter_bytes=limits.max_adapter_bytes,
        ),
        engines=[
            pb.EngineInfo(
                model=model,
                component=e.component.value,
                backend=e.backend,
                precision=e.precision,
                device=e.device,
                profile=e.profile.describe(),
            )
            for model, e in info["engines"]
        ],
        scheduler=pb.SchedulerInfo(
            fast_lane_max_steps=info["fast_lane_max_steps"],
            fast_lane_max_stretch=info["fast_lane_max_stretch"],
        ),
    )


ADAPTER_FORMATS = {
    adapter_pb.ADAPTER_FORMAT_KOHYA: "kohya",
    adapter_pb.ADAPTER_FORMAT_DIFFUSERS: "diffusers",
    adapter_pb.ADAPTER_FORMAT_PEFT: "peft",
    adapter_pb.ADAPTER_FORMAT_CLONEOFSIMO: "cloneofsimo",
    adapter_pb.ADAPTER_FORMAT_EMBEDDING: "embedding",
}
_ADAPTER_FORMAT_ENUMS = {name: value for value, name in ADAPTER_FORMATS.items()}


def adapter_format_hint(value: int) -> str | None:
    """The upload header's format: None (detect) for UNSPECIFIED."""
    if value == adapter_pb.ADAPTER_FORMAT_UNSPECIFIED:
        return None
    if value not in ADAPTER_FORMATS:
        raise InvalidArgument("header.format", f"unknown value {value}")
    return ADAPTER_FORMATS[value]


def adapter_info(record) -> adapter_pb.AdapterInfo:
    return adapter_pb.AdapterInfo(
        id=record.id,
        name=record.name,
        format=_ADAPTER_FORMAT_ENUMS.get(record.format, adapter_pb.ADAPTER_FORMAT_UNSPECIFIED),
        ranks=list(record.ranks),
        num_targets=record.num_targets,
        size_bytes=record.size_bytes,
        short_hash=record.short_hash,
        has_embeddings=record.has_embeddings,
        sha256=record.sha256,
        model=record.model,
        components=list(record.components),
        tokens=[adapter_pb.EmbeddingToken(token=token, num_vectors=n) for token, n in record.tokens],
    )
