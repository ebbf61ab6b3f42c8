"""The core's front door: what the rpc servicers call. Async, and free of protobuf.

`generate(spec)` validates, applies backpressure, loads the model if needed, resolves the
request's adapters (those it names, and the embeddings its prompts write by name), hands the
request to the step loop and yields its events. Image encoding happens here in a thread pool:
off the event loop and off the step loop. When the caller stops iterating (client cancelled or went
away), the request is aborted and leaves the batch at the next step boundary.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

from impasto import __version__
from impasto.backends.availability import all_backend_status
from impasto.config import ServerConfig

from impasto.lora import match_targets

from .adapter_registry import AdapterRecord, AdapterRegistry
from .adapter_syntax import extract_lora_tags, parse_schedule
from .adapter_weights import NO_ADAPTERS, ActiveAdapter, RequestAdapters, base_weight_shapes
from .engine_router import COMPILED_CONTEXT_LENGTH, CallShape
from .errors import InvalidArgument, NotFound, QueueFull
from .image_encoding import MIME_TYPES, encode_image
from .metrics import Metrics
from .model_layout import ModelLayouts
from .model_registry import ModelRegistry
from .prompt_encoding import vector_sources
from .request_state import RequestState
from .samplers import SAMPLERS, get_sampler
from .spec import Done, Event, Failed, GenerationSpec, ImageReady, Started
from .step_loop import DecodedImage, StepLoop
from .validation import resolve_spec


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    """A thread-safe emit for the step loop. If the caller's event loop is gone (it stopped
    iterating and closed), the event is dropped: the step loop must never fail because of it."""

    def emit(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # event loop closed
            pass

    return emit


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class ImageEngine:
    def __init__(self, config: ServerConfig, registry: ModelRegistry | None = None):
        self.config = config
        self.metrics = Metrics()
        self.registry = registry or ModelRegistry(
            config.models_dir,
            config.default_model,
            config.include_embedded_model,
            backends=config.backends,
            engines_dir=config.engines_dir,
            on_fallback=lambda reason: self.metrics.torch_fallbacks.labels(reason).inc(),
        )
        self.adapters = AdapterRegistry(config.resolved_adapters_dir, model_layouts=ModelLayouts(self._model_folder))
        self.step_loop = StepLoop(
            config.scheduler.max_batch_size,
            admission_wait_s=config.scheduler.admission_wait_ms / 1000.0,
            priority_aging_s=config.scheduler.priority_aging_s,
            max_running_images=config.scheduler.max_running_images or None,
            fast_lane_max_steps=config.scheduler.fast_lane_max_steps,
            fast_lane_max_stretch=config.scheduler.fast_lane_max_stretch,
            metrics=self.metrics,
            adapter_cache_bytes=config.limits.adapter_cache_bytes,
        )
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self.metrics.queue_length.set_function(lambda: self._waiting)
        self._encoder_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="impasto-encode")
        self._loader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="impasto-load")
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------
    def start(self, preload_default: bool = True) -> None:
        if self.config.scheduler.intra_op_threads:
            import torch

            torch.set_num_threads(self.config.scheduler.intra_op_threads)
        if preload_default:
            self.registry.load("")
        self.step_loop.start()

    def stop(self) -> None:
        self.step_loop.stop()
        self._encoder_pool.shutdown(wait=False, cancel_futures=True)
        self._loader_pool.shutdown(wait=False, cancel_futures=True)

    # --- generation -------------------------------------------------------------------------
    async def generate(self, spec: GenerationSpec, request_id: str = "") -> AsyncIterator[Event | ImageReady]:
        try:
            entry = self.registry.resolve(spec.model)
        except NotFound as exc:
            raise InvalidArgument("model", str(exc).removeprefix("model: ")) from None
        resolved = resolve_spec(spec, entry, self.config.limits)
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(self._loader_pool, self.registry.load, entry.name)
        # `<lora:...>` tags leave the text the model sees; the infotext keeps them (as A1111 does).
        if spec.adapters or "<lora:" in spec.prompt or self._may_name_embeddings(spec.prompt, resolved.negative_prompt):
            text_prompt, adapters = await loop.run_in_executor(
                self._loader_pool, self._request_adapters, spec, resolved.negative_prompt, model
            )
        else:
            text_prompt, adapters = spec.prompt, NO_ADAPTERS
        # The set's textual-inversion tokens become their vectors in both prompts (prompt_encoding.py).
        chunks, negative_chunks = model.tokenizer.pair(text_prompt, resolved.negative_prompt, adapters.prompt_embeddings())
        if adapters.items:  # the embeddings used, for the infotext's TI hashes
            adapters = replace(adapters, used_embeddings=vector_sources(chunks + negative_chunks))
        if adapters.has_schedule:  # refitted before each of its UNet calls (it runs alone: its own batch)
            batch = resolved.num_images * (2 if resolved.uses_cfg else 1)
            unet_call = CallShape(batch, resolved.width, resolved.height, COMPILED_CONTEXT_LENGTH * len(chunks))
            adapters.check_schedule_cost(model.engines.unet, unet_call, self._base_shapes(model))

        with self._waiting_lock:
            if self._waiting >= self.config.limits.max_queue_length:
                raise QueueFull(f"the queue is full ({self._waiting} of {self.config.limits.max_queue_length} requests waiting); retry later")
            self._waiting += 1
        still_waiting = True

        def left_queue() -> None:
            nonlocal still_waiting
            if still_waiting:
                still_waiting = False
                with self._waiting_lock:
                    self._waiting -= 1

        events: asyncio.Queue = asyncio.Queue()
        request_id = request_id or new_request_id()
        state = RequestState(
            request_id=request_id,
            spec=resolved,
            sampler=get_sampler(resolved.sampler),
            model=model,
            adapters=adapters,
            chunks=chunks,
            negative_chunks=negative_chunks,
            emit=_emitter(loop, events),
        )
        self.step_loop.submit(state)
        finished = False
        outcome = "cancelled"
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    finished, outcome = True, "error"
                    raise event.error
                if isinstance(event, Started):
                    left_queue()
                if isinstance(event, DecodedImage):
                    data = await loop.run_in_executor(
                        self._encoder_pool, encode_image, event.pixels, resolved.image_format, event.infotext
                    )
                    yield ImageReady(event.index, data, MIME_TYPES[resolved.image_format], event.seed, event.infotext)
                    continue
                yield event
                if isinstance(event, Done):
                    finished, outcome = True, "ok"
                    return
        finally:
            left_queue()
            self.metrics.requests.labels(outcome).inc()
            if not finished:
                self.metrics.cancellations.inc()
                self.step_loop.abort(request_id)

    # --- adapters ---------------------------------------------------------------------------
    def _base_shapes(self, model) -> dict[str, tuple[int, ...]]:
        shapes = self._shapes.get(model.entry.name)
        if shapes is None:
            shapes = base_weight_shapes(model.engines.unet, "unet") | base_weight_shapes(model.engines.text_encoder, "text_encoder")
            self._shapes[model.entry.name] = shapes
        return shapes

    def _model_folder(self, name: str) -> Path | None:
        return next((e.path for e in self.registry.list() if e.name == name), None)

    def _active(self, record: AdapterRecord, weight: float, schedule=None, schedule_field: str = "") -> ActiveAdapter:
        return ActiveAdapter(
            record=record,
            alias=record.name,
            weight=float(weight),
            schedule=schedule,
            unet=self.adapters.view(record, "unet"),
            text_encoder=self.adapters.view(record, "text_encoder"),
            schedule_field=schedule_field,
        )

    def _fits(self, record: AdapterRecord, model) -> list[str]:
        """Why the adapter does not fit the model (empty: it fits). It was checked on upload
        against `record.model`; another model is checked now."""
        if record.model == model.entry.name:
            return []
        return match_targets(self.adapters.load(record), self._base_shapes(model)).errors

    def _may_name_embeddings(self, prompt: str, negative_prompt: str) -> bool:
        """Cheap, on the event loop: could the prompts use an embedding by name?"""
        if not self.config.apply_embeddings_named_in_prompt:
            return False
        index = self.adapters.embedding_index
        return bool(index.written_in(prompt) or index.written_in(negative_prompt))

    def _embeddings_named_in(self, prompt: str, negative_prompt: str, named: list[ActiveAdapter], model) -> list[ActiveAdapter]:
        """A1111's embeddings by name (embedding_index.py): the embedding-only adapters whose token
        the prompts write, unless an adapter the request names defines that token (naming is how
        a request picks between two). One that does not fit the model is left as words, as A1111
        skips embeddings made for another model; two that fit, with one token, are refused, since
        which was meant cannot be known."""
        defined = {token.lower() for a in named for token, _ in a.record.tokens}
        found: dict[str, ActiveAdapter] = {}
        for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            for token, records in self.adapters.embedding_index.written_in(text).items():
                if token in defined:
                    continue
                fitting = [r for r in records if not self._fits(r, model)]
                if len(fitting) > 1:
                    spelled = next(t for t, _ in fitting[0].tokens if t.lower() == token)
                    names = " and ".join(f"'{r.name}'" for r in fitting)
                    raise InvalidArgument(
                        field,
                        f"the embedding token {spelled!r} belongs to adapters {names}; name the one meant (adapters or <lora:name>)",
                    )
                if fitting and fitting[0].id not in found:
                    found[fitting[0].id] = self._active(fitting[0], 1.0)  # a weight never scales vectors
        return list(found.values())

    def _request_adapters(self, spec: GenerationSpec, negative_prompt: str, model) -> tuple[str, RequestAdapters]:
        """(the prompt without `<lora:>` tags, the request's adapters resolved and checked): those it
        names, then the embeddings its prompts use by name."""
        text, tags = extract_lora_tags(spec.prompt)
        refs = [(t.name, t.weight, t.schedule, "prompt", "prompt") for t in tags]
        for i, ref in enumerate(spec.adapters):
            schedule = parse_schedule(ref.weight_schedule, f"adapters[{i}].weight_schedule") if ref.weight_schedule else None
            refs.append((ref.adapter, ref.weight, schedule, f"adapters[{i}].adapter", f"adapters[{i}].weight_schedule"))
        items: list[ActiveAdapter] = []
        for ref, weight, schedule, field, schedule_field in refs:
            try:
                record = self.adapters.resolve(ref)
            except NotFound as exc:
                raise InvalidArgument(field, str(exc)) from None
            if any(a.record.id == record.id for a in items):
                raise InvalidArgument(field, f"adapter '{record.name}' is named twice; name it once with the summed weight")
            errors = self._fits(record, model)
            if errors:
                raise InvalidArgument(field, f"adapter '{record.name}' does not fit model '{model.entry.name}': " + "; ".join(errors))
            items.append(self._active(record, weight, schedule, schedule_field))
        if self.config.apply_embeddings_named_in_prompt:
            items += self._embeddings_named_in(text, negative_prompt, items, model)
        return text, RequestAdapters(tuple(items))

    async def upload_adapter(
        self, *, name: str, format: str | None, model: str, chunks: AsyncIterator[bytes], declared_size: int = 0
    ) -> tuple[AdapterRecord, bool]:
        """Store an adapter from a stream of byte chunks; (record, already_existed)."""
        limit = self.config.limits.max_adapter_bytes
        too_big = f"the adapter size limit is {limit} bytes (limits.max_adapter_bytes)"
        self.adapters.check_name(name, format)
        if declared_size > limit:
            raise InvalidArgument("size_bytes", f"{declared_size} bytes; {too_big}")
        try:
            entry = self.registry.resolve(model)
        except NotFound as exc:
            raise InvalidArgument("model", str(exc).removeprefix("model: ")) from None
        loop = asyncio.get_running_loop()
        path = self.adapters.new_upload_path()
        try:
            total = 0
            with open(path, "wb") as f:
                async for chunk in chunks:
                    total += len(chunk)
                    if total > limit:
                        raise InvalidArgument("data", f"the upload passed {limit} bytes; {too_big}")
                    f.write(chunk)
            if total == 0:
                raise InvalidArgument("data", "the upload holds no bytes")
            loaded = await loop.run_in_executor(self._loader_pool, self.registry.load, entry.name)
            shapes = self._base_shapes(loaded)
            add = partial(self.adapters.add, path, name=name, format=format, model=entry.name, named_weight_shapes=shapes)
            return await loop.run_in_executor(self._loader_pool, add)
        finally:
            self.adapters.discard(path)

    def list_adapters(self) -> list[AdapterRecord]:
        return self.adapters.list()

    def delete_adapter(self, ref: str) -> AdapterRecord:
        if not ref:
            raise InvalidArgument("adapter", "must name an adapter (id or name)")
        try:
            return self.adapters.delete(ref)
        except NotFound as exc:
            raise NotFound(f"adapter: {exc}") from None

    # --- descriptions -----------------------------------------------------------------------
    def models(self):
        return self.registry.list()

    @staticmethod
    def samplers():
        return list(SAMPLERS.values())

    def server_info(self) -> dict:
        return {
            "version": __version__,
            "backends": all_backend_status(),
            "limits": self.config.limits,
            "max_batch_size": self.config.scheduler.max_batch_size,
            "fast_lane_max_steps": self.config.scheduler.fast_lane_max_steps,
            "fast_lane_max_stretch": self.config.scheduler.fast_lane_max_stretch,
            "default_model": self.registry.default_name,
            # Every engine behind each router: compiled ones in preference order, then torch.
            "engines": [
                (m.entry.name, engine.info())
                for m in self.registry.loaded()
                for routed in m.engines.all()
                for engine in (routed.engines() if hasattr(routed, "engines") else [routed])
            ],
        }
