"""Route each engine call to the best engine that fits it, with torch as the fallback.

A model may have compiled engines from several backends (in the server's preference order)
plus its torch engines. The router is itself an `Engine`, so the step loop does not know
which backend ran a call. For each call it takes the first engine whose shape profile
accepts the call's batch and image size; a static engine whose batch is larger than the
call is padded, and a call larger than an engine's batch is split. When no compiled engine
fits, the torch engine runs it and the fallback is counted and logged with the reason. A
text-encoder call that carries textual-inversion vectors (`token_vectors`) always runs on torch
(reason "embeddings"): compiled encoders are exported with input_ids alone.

Refit is lazy: the router remembers the weights asked for, and brings an engine up to date
(restore, then refit) only when that engine is next used, so a LoRA switch costs one refit
of the engine that actually runs, not of every backend loaded.

The router times what it runs (per engine: a refit's seconds per weight element written, a
run's seconds per sample pixel), so that `schedule_refusal` can tell whether refitting before
every step (a per-step weight schedule) would cost more than the steps themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from impasto.backends.base import Component, Engine, EngineInfo

log = logging.getLogger(__name__)

# CLIP's context: compiled UNets are exported for one 77-token chunk. A1111-style long prompts
# (77*k tokens) run on an engine that declares their length, or on torch.
COMPILED_CONTEXT_LENGTH = 77

# A weight schedule (`<lora:name:0@0,1@0.5>`, adapters[i].weight_schedule) makes a new adapter
# set at every step, so each step pays a merge and a refit of the engine that runs it. Refused
# when the engine's measured refit would take longer than the step itself (the request's time
# more than doubled). benchmarks/lora_switch.py (commit 7ce83ad; 2-core EPYC, load ~3, 1 thread,
# UNet at CFG batch 2), per-step merge + refit (refit alone) against the step:
#   default model, LoRA on 100 attention/ff/conv weights (3 MB), steps of 6-14 ms:
#     torch (merged in place, no refit) 0.09x; onnxruntime 0.31x (0.12x); openvino fp32 0.42x
#     (0.16x); openvino bf16 0.74x (0.14x)
#   SD 1.5 UNet at 256x256, LoRA on its 128 attention weights (357 MB), steps of 1.4-3.7 s:
#     torch 0.01x; onnxruntime 0.12x (0.09x); openvino fp32 0.11x (0.09x); bf16 0.18x (0.14x)
# So on these CPU engines (a refit is a host memory copy) schedules run. They are refused where a
# refit is a rebuild or a device upload and a step is short: OpenVINO's "recompile" refit mode
# (every profile recompiled: ~20x the step on the default model, tested), TensorRT on a GPU
# (refit_cuda_engine against a step of tens of ms; not measured here: no GPU). The rule compares
# figures this server measures rather than naming backends. An engine with no figures yet
# (never refitted, or never run) is let through: its first use measures it. The merge (torch;
# about a quarter of the refit on SD 1.5) is not counted.
SCHEDULE_MAX_REFIT_PER_STEP = 1.0  # refit seconds per step seconds
_EMA = 0.3  # weight of a new measurement


def schedule_too_slow(refit_s: float, step_s: float) -> bool:
    return refit_s > SCHEDULE_MAX_REFIT_PER_STEP * step_s


@dataclass(frozen=True)
class CallShape:
    batch: int
    width: int  # pixels
    height: int
    context_length: int | None = None
    token_vectors: bool = False  # a text-encoder call with injected vectors (torch only)


def _call_shape(component: Component, inputs: Mapping[str, torch.Tensor], vae_scale_factor: int) -> CallShape:
    if component == Component.UNET:
        sample = inputs["sample"]
        ctx = inputs["encoder_hidden_states"].shape[1]
        return CallShape(sample.shape[0], sample.shape[-1] * vae_scale_factor, sample.shape[-2] * vae_scale_factor, ctx)
    if component == Component.VAE_DECODER:
        latent = inputs["latent"]
        return CallShape(latent.shape[0], latent.shape[-1] * vae_scale_factor, latent.shape[-2] * vae_scale_factor)
    if component == Component.VAE_ENCODER:
        image = inputs["image"]
        return CallShape(image.shape[0], image.shape[-1], image.shape[-2])
    ids = inputs["input_ids"]
    return CallShape(ids.shape[0], 0, 0, token_vectors="token_vectors" in inputs)


class RoutedEngine(Engine):
    def __init__(
        self,
        component: Component,
        compiled: list[Engine],
        fallback: Engine,
        vae_scale_factor: int,
        on_fallback: Callable[[str], None] = lambda reason: None,
    ):
        self.component = component
        self.compiled = compiled
        self.fallback = fallback
        self.vae_scale_factor = vae_scale_factor
        self.on_fallback = on_fallback
        self._wanted: dict[str, torch.Tensor] = {}  # refitted weights, by torch name
        self._version = 0
        self._engine_version: dict[int, int] = {}
        self.last_backend = ""
        self._logged: set[str] = set()
        # Measured costs by engine id (EMA): a refit's seconds per weight element it wrote, and a
        # run's seconds per sample pixel (batch x width x height; batch alone for text).
        self._refit_rate: dict[int, float] = {}
        self._run_rate: dict[int, float] = {}
        # The torch engine's in-place refit (a LoRA switch that allocates nothing) only makes
        # sense when torch is the only engine: compiled engines need the full values, which
        # `refit` keeps for them. The base values always come from the torch engine.
        if not compiled and getattr(fallback, "refit_in_place", None) is not None:
            self.refit_in_place = self._refit_fallback_in_place
        if getattr(fallback, "pristine_weights", None) is not None:
            self.pristine_weights = fallback.pristine_weights

    # --- picking ----------------------------------------------------------------------------
    def _fits(self, engine: Engine, shape: CallShape) -> bool:
        profile = engine.info().profile
        if self.component == Component.UNET and shape.context_length != COMPILED_CONTEXT_LENGTH:
            return False
        if self.component == Component.TEXT_ENCODER:
            # One chunk is always 77 tokens; any batch is split or padded in run().
            return not shape.token_vectors
        return profile.sizes is None or (shape.width, shape.height) in profile.sizes

    def pick(self, shape: CallShape) -> tuple[Engine, str]:
        for engine in self.compiled:
            if self._fits(engine, shape):
                return engine, ""
        if not self.compiled:
            return self.fallback, ""
        if self.component == Component.UNET and shape.context_length != COMPILED_CONTEXT_LENGTH:
            reason = "context_length"
        elif shape.token_vectors:
            reason = "embeddings"
        else:
            reason = "no_profile"
        return self.fallback, reason

    # --- the contract -----------------------------------------------------------------------
    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shape = _call_shape(self.component, inputs, self.vae_scale_factor)
        engine, reason = self.pick(shape)
        if reason:
            self.on_fallback(reason)
            key = f"{reason}:{shape}"
            if key not in self._logged:
                self._logged.add(key)
                log.info("%s: no compiled engine fits %s (%s); running on torch", self.component.value, shape, reason)
        self._bring_up_to_date(engine)
        self.last_backend = engine.info().backend
        started = time.perf_counter()
        if engine is self.fallback:
            outputs = engine.run(inputs)
        else:
            outputs = self._run_in_batches(engine, inputs, shape.batch)
        _observe(self._run_rate, engine, (time.perf_counter() - started) / _pixels(shape))
        return outputs

    def _run_in_batches(self, engine: Engine, inputs: Mapping[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        profile = engine.info().profile
        max_batch = profile.max_batch or batch
        outputs: list[dict[str, torch.Tensor]] = []
        for start in range(0, batch, max_batch):
            part = {k: v[start : start + max_batch] for k, v in inputs.items()}
            rows = min(max_batch, batch - start)
            pad = max(0, profile.min_batch - rows)
            if pad:  # a static engine takes exactly its batch: pad with copies of the last row
                part = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in part.items()}
            out = engine.run(part)
            outputs.append({k: v[:rows] for k, v in out.items()})
        if len(outputs) == 1:
            return outputs[0]
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}

    def refit(self, named_weights: Mapping[str, torch.Tensor]) -> None:
        self._wanted.update(named_weights)
        self._version += 1

    def restore(self) -> None:
        self._wanted.clear()
        self._version += 1

    def _refit_fallback_in_place(self, names, write) -> None:
        # The torch engine may lag behind (refit is lazy): a weight an older, never-run set
        # changed must not survive, so it starts from the base, then is current at once.
        if self._engine_version.get(id(self.fallback), 0) != self._version:
            self.fallback.restore()
        self._wanted.clear()
        self._version += 1
        self.fallback.refit_in_place(names, write)
        self._engine_version[id(self.fallback)] = self._version

    def _bring_up_to_date(self, engine: Engine) -> None:
        if self._engine_version.get(id(engine), 0) == self._version:
            return
        started = time.perf_counter()
        engine.restore()
        if self._wanted:
            engine.refit(self._wanted)
            elements = sum(w.numel() for w in self._wanted.values())
            _observe(self._refit_rate, engine, (time.perf_counter() - started) / elements)
        self._engine_version[id(engine)] = self._version

    def schedule_refusal(self, shape: CallShape, num_elements: int) -> str:
        """Why a request whose adapter set changes at every step (refitting `num_elements` weight
        elements before each call of `shape`) should not run here, or "" (see
        SCHEDULE_MAX_REFIT_PER_STEP). Torch alone merges into its weights in place (no refit)."""
        engine, _ = self.pick(shape)
        if not self.compiled:
            return ""  # a schedule's sets are merged into torch's weights in place (_refit_fallback_in_place)
        refit_rate, run_rate = self._refit_rate.get(id(engine)), self._run_rate.get(id(engine))
        if refit_rate is None or run_rate is None:
            return ""
        refit_s, step_s = refit_rate * num_elements, run_rate * _pixels(shape)
        if not schedule_too_slow(refit_s, step_s):
            return ""
        return (
            f"a weight schedule refits the UNet before every step; on this model's {engine.info().backend} engine that takes "
            f"about {refit_s * 1000:.0f} ms per step against {step_s * 1000:.0f} ms for the step itself (measured here), "
            "more than doubling the request's time"
        )

    def info(self) -> EngineInfo:
        first = self.compiled[0] if self.compiled else self.fallback
        return first.info()

    def engines(self) -> list[Engine]:
        return [*self.compiled, self.fallback]

    def named_weights(self) -> dict[str, torch.Tensor]:
        return self.fallback.named_weights()  # the torch engine holds the base weights by name


def _pixels(shape: CallShape) -> int:
    return shape.batch * max(1, shape.width * shape.height)


def _observe(rates: dict[int, float], engine: Engine, value: float) -> None:
    old = rates.get(id(engine))
    rates[id(engine)] = value if old is None else old + _EMA * (value - old)
