"""Typed events of a Generate stream, and the plain records the list calls return."""

from __future__ import annotations

from dataclasses import dataclass

from .pb import image_service_pb2 as pb


@dataclass(frozen=True)
class Queued:
    request_id: str
    position: int


@dataclass(frozen=True)
class Started:
    request_id: str
    model: str
    sampler: str
    width: int
    height: int
    num_steps: int
    guidance_scale: float
    seed: int
    num_images: int


@dataclass(frozen=True)
class Progress:
    request_id: str
    step: int
    num_steps: int
    eta_seconds: float
    preview: bytes
    preview_mime_type: str


@dataclass(frozen=True)
class Image:
    request_id: str
    index: int
    data: bytes
    mime_type: str
    seed: int
    infotext: str


@dataclass(frozen=True)
class Done:
    request_id: str
    num_images: int
    elapsed_seconds: float


Event = Queued | Started | Progress | Image | Done


def from_response(response: pb.GenerateResponse) -> Event:
    kind = response.WhichOneof("event")
    rid = response.request_id
    if kind == "queued":
        return Queued(rid, response.queued.position)
    if kind == "started":
        s = response.started
        return Started(rid, s.model, s.sampler, s.width, s.height, s.num_steps, s.guidance_scale, s.seed, s.num_images)
    if kind == "progress":
        p = response.progress
        return Progress(rid, p.step, p.num_steps, p.eta_seconds, p.preview, p.preview_mime_type)
    if kind == "image":
        i = response.image
        return Image(rid, i.index, i.data, i.mime_type, i.seed, i.infotext)
    if kind == "done":
        return Done(rid, response.done.num_images, response.done.elapsed_seconds)
    raise ValueError(f"unknown event in response: {kind!r} (is the client older than the server?)")


_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "jpg": pb.IMAGE_FORMAT_JPEG, "webp": pb.IMAGE_FORMAT_WEBP}
_PRIORITIES = {"interactive": pb.PRIORITY_INTERACTIVE, "batch": pb.PRIORITY_BATCH}


def adapter_ref(adapter: str, weight: float | str = 1.0) -> pb.AdapterRef:
    """(name or id, weight) -> AdapterRef; a string weight with '@' is a per-step schedule
    ("0@0,1@0.5": weight 0 at the start, 1 from half-way, linear in between)."""
    if isinstance(weight, str):
        if "@" in weight:
            return pb.AdapterRef(adapter=adapter, weight_schedule=weight)
        weight = float(weight)
    return pb.AdapterRef(adapter=adapter, weight=weight)


def build_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    model: str = "",
    width: int = 0,
    height: int = 0,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str = "",
    seed: int | None = None,
    num_images: int = 1,
    image_format: str = "png",
    preview_every: int = 0,
    progress_interval_ms: int | None = None,
    adapters: list[tuple[str, float] | tuple[str, float | str]] | None = None,
    priority: str = "interactive",
) -> pb.GenerateRequest:
    if image_format.lower() not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    if priority not in _PRIORITIES:
        raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, got {priority!r}")
    request = pb.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        model=model,
        width=width,
        height=height,
        sampler=sampler,
        num_images=num_images,
        image_format=_FORMATS[image_format.lower()],
        preview_every=preview_every,
        progress_interval_ms=progress_interval_ms,
        adapters=[adapter_ref(a, w) for a, w in (adapters or [])],
        priority=_PRIORITIES[priority],
    )
    if num_steps is not None:
        request.num_steps = num_steps
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    return request
