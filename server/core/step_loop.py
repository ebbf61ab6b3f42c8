"""The step loop: one thread that drives the engines, one step boundary at a time.

Each iteration is three verbs (DESIGN.md):
- schedule(): the request scheduler admits waiting requests and picks the batch;
- execute(): one UNet call on the stacked latents of the batch, with per-sample timesteps
  and both CFG halves in the same call;
- update(): each request's own noise scheduler steps, and its progress event goes out.

The loop runs in its own thread because engine calls block for milliseconds to seconds;
torch and the compiled runtimes release the GIL, so the asyncio event loop keeps serving.
Requests and cancellations reach it through a thread-safe inbox; events leave through each
request's `emit` callback (which hops back onto the event loop).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from impasto.lora import DeltaCache

from .adapter_weights import ModelAdapters
from .image_encoding import thumbnail, to_uint8
from .infotext import format_infotext
from .metrics import Metrics
from .prompt_encoding import EmbeddingCache
from .request_state import RequestState
from .scheduler import RequestScheduler, ScheduledRequest
from .spec import Done, Failed, Progress, Queued, Started

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedImage:
    """Internal event: an image's pixels, to be encoded off the loop by the front end."""

    index: int
    pixels: object  # HxWx3 uint8 numpy array
    seed: int
    infotext: str


@dataclass
class StepStats:
    steps: int = 0
    batches: int = 0
    batched_images: int = 0
    mixed_step_batches: int = 0  # calls that joined requests at different step indices
    adapter_switches: int = 0  # refits of an engine to another adapter set


class StepLoop:
    def __init__(
        self,
        max_batch_size: int,
        *,
        admission_wait_s: float = 0.0,
        priority_aging_s: float = 30.0,
        max_running_images: int | None = None,
        fast_lane_max_steps: int = 8,
        fast_lane_max_stretch: float = 1.5,
        metrics: Metrics | None = None,
        embedding_cache_entries: int = 1024,
        adapter_cache_bytes: int = 2 * 1024**3,
    ):
        self.scheduler = RequestScheduler(
            max_batch_size,
            priority_aging_s=priority_aging_s,
            max_running_images=max_running_images,
            fast_lane_max_steps=fast_lane_max_steps,
            fast_lane_max_stretch=fast_lane_max_stretch,
        )
        self.admission_wait_s = admission_wait_s
        self.metrics = metrics or Metrics()
        self.embeddings = EmbeddingCache(embedding_cache_entries)
        self.stats = StepStats()
        # Merged LoRA weights per adapter set, shared by every model's engines (keys carry the model hash).
        self.adapter_cache = DeltaCache(adapter_cache_bytes)
        self._model_adapters: dict[str, ModelAdapters] = {}
        self.metrics.adapter_cache_bytes.set_function(lambda: self.adapter_cache.nbytes)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, RequestState] = {}
        self._positions: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impasto-step-loop", daemon=True)

    # --- called from other threads ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    def submit(self, state: RequestState) -> None:
        self._inbox.put(("add", state))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # --- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            idle = not self.scheduler.has_work()
            self._drain_inbox(block=idle)
            if idle and self.admission_wait_s > 0:
                # Woken from idle by a request: give its neighbours a moment to arrive, so the
                # first step already runs them together.
                deadline = time.monotonic() + self.admission_wait_s
                while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                    self._drain_inbox(block=True, timeout=left)
            if self._stop.is_set():
                break
            try:
                self._iterate()
            except Exception:  # a bug must not kill the loop: fail what was running, go on
                log.exception("step loop iteration failed")
                for request_id in list(self._requests):
                    self._fail(request_id, RuntimeError("internal error in the step loop; see server log"))

    def _drain_inbox(self, block: bool, timeout: float | None = None) -> None:
        try:
            item = self._inbox.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                self._requests[payload.request_id] = payload
                self.scheduler.add(
                    ScheduledRequest(
                        request_id=payload.request_id,
                        batch_key=payload.batch_key,
                        num_images=payload.spec.num_images,
                        num_steps=payload.num_denoiser_steps,
                        priority=int(payload.spec.priority),
                        arrival=payload.arrival,
                    )
                )
            elif kind == "abort":
                self.scheduler.abort(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _iterate(self) -> None:
        out = self.scheduler.schedule(time.monotonic())
        for request_id in out.aborted:
            self._requests.pop(request_id, None)
            self._positions.pop(request_id, None)
        self._report_positions()
        self.metrics.running.set(self.scheduler.num_running)
        if out.admitted:
            self._admit([self._requests[r] for r in out.admitted])
        if out.batch:
            batch = [self._requests[r] for r in out.batch]
            started = time.perf_counter()
            try:
                noise_preds = self._execute(batch)
                self._update(batch, noise_preds)
            except Exception as exc:
                log.exception("step failed for batch %s", out.batch)
                for state in batch:
                    self.scheduler.abort(state.request_id)
                    self._fail(state.request_id, exc)
                return
            step_seconds = time.perf_counter() - started
            self._record_step_time(step_seconds, batch)
            finished = self.scheduler.update(out.batch, time.monotonic(), step_seconds)
            self._emit_progress(batch)
            if finished:
                self._finish([self._requests[r] for r in finished])

    # --- admission --------------------------------------------------------------------------
    def adapters_of(self, model) -> ModelAdapters:
        """The adapter state of a model's engines (step-loop thread only)."""
        state = self._model_adapters.get(model.entry.name)
        if state is None:
            state = self._model_adapters[model.entry.name] = ModelAdapters(model, self.adapter_cache)
        return state

    def _apply_adapters(self, engine_adapters, items, keep: bool = True) -> None:
        seconds = engine_adapters.apply(items, keep=keep)
        if seconds is not None:
            self.stats.adapter_switches += 1
            self.metrics.adapter_switch_seconds.labels(engine_adapters.component).observe(seconds)

    def _admit(self, states: list[RequestState]) -> None:
        # One text-encoder pass per (model, text-encoder adapter set): the set is refitted into
        # the encoder only when a chunk misses the cache, and the cache keys on the set.
        groups: dict[tuple, list[RequestState]] = {}
        for state in states:
            self._positions.pop(state.request_id, None)
            groups.setdefault((state.model.entry.name, state.adapters.text_key()), []).append(state)
        for (_, text_key), group in groups.items():
            model = group[0].model
            chunk_lists = []
            for state in group:
                chunk_lists.append(state.chunks)
                if state.spec.uses_cfg:
                    chunk_lists.append(state.negative_chunks)
            encoder = model.engines.text_encoder
            text_set = group[0].adapters.text_encoder_set()

            def run_text_encoder(inputs, model=model, encoder=encoder, text_set=text_set):
                # `inputs` carry textual-inversion vectors when a chunk has them; the router then
                # runs them on torch (prompt_encoding.encoder_inputs, engine_router).
                self._apply_adapters(self.adapters_of(model).text_encoder, text_set)
                return encoder.run(inputs)["last_hidden_state"]

            hits, misses = self.embeddings.hits, self.embeddings.misses
            try:
                embeds = iter(self.embeddings.encode(chunk_lists, (model.entry.name, text_key), run_text_encoder))
            except Exception as exc:
                for state in group:
                    self.scheduler.abort(state.request_id)
                    self._fail(state.request_id, exc)
                continue
            self.metrics.embedding_cache_hits.inc(self.embeddings.hits - hits)
            self.metrics.embedding_cache_misses.inc(self.embeddings.misses - misses)
            for state in group:
                try:
                    state.cond = next(embeds)
                    state.uncond = next(embeds) if state.spec.uses_cfg else None
                    state.prepare()
                except Exception as exc:
                    self.scheduler.abort(state.request_id)
                    self._fail(state.request_id, exc)
                    continue
                state.emit(Started(spec=state.spec, num_denoiser_steps=len(state.timesteps)))

    # --- execute ----------------------------------------------------------------------------
    def _execute(self, batch: list[RequestState]) -> torch.Tensor:
        # One batch has one UNet adapter set (its batch key); a scheduled weight is evaluated at
        # the request's own step (a request with a schedule runs alone).
        head = batch[0]
        adapters = head.adapters
        self._apply_adapters(self.adapters_of(head.model).unet, adapters.unet_set(head.step_fraction), keep=not adapters.has_schedule)
        samples, timesteps, contexts = [], [], []
        for state in batch:
            t = state.timesteps[state.step_index]
            for seq in state.sequences:
                x = seq.noise_scheduler.scale_model_input(seq.latents, t)
                if state.spec.uses_cfg:
                    samples += [x, x]
                    contexts += [state.uncond, state.cond]
                    timesteps += [t, t]
                else:
                    samples.append(x)
                    contexts.append(state.cond)
                    timesteps.append(t)
        inputs = {
            "sample": torch.cat(samples),
            "timestep": torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in timesteps]),
            "encoder_hidden_states": torch.cat(contexts),
        }
        return batch[0].model.engines.unet.run(inputs)["noise_pred"]

    # --- update -----------------------------------------------------------------------------
    def _update(self, batch: list[RequestState], noise_preds: torch.Tensor) -> None:
        row = 0
        for state in batch:
            t = state.timesteps[state.step_index]
            for seq in state.sequences:
                if state.spec.uses_cfg:
                    uncond, cond = noise_preds[row : row + 1], noise_preds[row + 1 : row + 2]
                    noise_pred = uncond + state.spec.guidance_scale * (cond - uncond)
                    row += 2
                else:
                    noise_pred = noise_preds[row : row + 1]
                    row += 1
                result = seq.noise_scheduler.step(noise_pred, t, seq.latents, **seq.step_kwargs, return_dict=True)
                seq.latents = result.prev_sample
                seq.denoised = getattr(result, "pred_original_sample", None)
            state.step_index += 1

    def _record_step_time(self, seconds: float, batch: list[RequestState]) -> None:
        s = self.stats
        images = sum(st.spec.num_images for st in batch)
        s.steps += 1
        s.batches += 1
        s.batched_images += images
        s.mixed_step_batches += len({st.step_index for st in batch}) > 1
        self.metrics.batch_size.observe(images)
        self.metrics.unet_step_seconds.observe(seconds)

    def _emit_progress(self, batch: list[RequestState]) -> None:
        for state in batch:
            if state.request_id not in self._requests:
                continue
            num_steps = len(state.timesteps)
            remaining = num_steps - state.step_index
            preview, mime = b"", ""
            every = state.spec.preview_every
            if every and state.step_index % every == 0 and remaining > 0:
                preview, mime = self._preview(state), "image/jpeg"
            if state.step_index == 1:
                self.metrics.time_to_first_progress.observe(time.monotonic() - state.arrival)
            state.emit(Progress(state.step_index, num_steps, remaining * self._step_interval(state), preview, mime))

    @staticmethod
    def _step_interval(state: RequestState) -> float:
        """This request's own seconds per step, as it experiences them (EMA of the time between
        its progress events): that includes the steps other groups run in between, which a
        global step time would not, so the ETA holds under mixed load."""
        now = time.monotonic()
        interval = now - (state.last_progress_at or state.started_at)
        state.last_progress_at = now
        state.ema_step_interval = interval if not state.ema_step_interval else 0.7 * state.ema_step_interval + 0.3 * interval
        return state.ema_step_interval

    def _preview(self, state: RequestState) -> bytes:
        # Decodes the sampler's clean estimate of image 0 with the real VAE: exact, and on the
        # tiny model cheap; on SD1.5 it costs about one UNet step, so clients ask for it sparingly.
        seq = state.sequences[0]
        latents = seq.denoised if seq.denoised is not None else seq.latents
        image = state.model.engines.vae_decoder.run({"latent": latents / state.model.vae_scaling_factor})["image"]
        return thumbnail(to_uint8(image)[0])

    # --- leaving ----------------------------------------------------------------------------
    def _finish(self, states: list[RequestState]) -> None:
        by_model: dict[str, list[RequestState]] = {}
        for state in states:
            by_model.setdefault(state.model.entry.name, []).append(state)
        for group in by_model.values():
            model = group[0].model
            latents = torch.cat([seq.latents for state in group for seq in state.sequences])
            try:
                images = model.engines.vae_decoder.run({"latent": latents / model.vae_scaling_factor})["image"]
            except Exception as exc:
                for state in group:
                    self._fail(state.request_id, exc)
                continue
            pixels = to_uint8(images)
            i = 0
            for state in group:
                for k, seq in enumerate(state.sequences):
                    state.emit(DecodedImage(k, pixels[i], seq.seed, self._infotext(state, seq.seed)))
                    i += 1
                state.emit(Done(state.spec.num_images, time.monotonic() - state.arrival))
                self.metrics.images.inc(state.spec.num_images)
                self._requests.pop(state.request_id, None)

    @staticmethod
    def _infotext(state: RequestState, seed: int) -> str:
        spec = state.spec
        return format_infotext(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            num_steps=spec.num_steps,
            sampler_display_name=state.sampler.display_name,
            guidance_scale=spec.guidance_scale,
            seed=seed,
            width=spec.width,
            height=spec.height,
            model_hash=state.model.entry.short_hash,
            model_name=state.model.entry.name,
            extra=state.adapters.infotext(),
        )

    def _fail(self, request_id: str, error: BaseException) -> None:
        state = self._requests.pop(request_id, None)
        self._positions.pop(request_id, None)
        if state is not None:
            state.emit(Failed(error))

    def _report_positions(self) -> None:
        for request_id, position in self.scheduler.waiting_positions(time.monotonic()).items():
            if self._positions.get(request_id) != position:
                self._positions[request_id] = position
                self._requests[request_id].emit(Queued(position))
