"""The engine router: picks a compiled engine whose profile fits, pads and splits static
batches, falls back to torch with a reason, and refits lazily without ever blending."""

from __future__ import annotations

import time

import torch

from impasto.backends.base import Component, Engine, EngineInfo, ShapeProfile
from impasto.core.engine_router import CallShape, RoutedEngine


class RecordingUNet(Engine):
    """Adds its single weight to the sample; records the batch sizes it was called with."""

    def __init__(self, backend: str, profile: ShapeProfile):
        self.backend, self.profile = backend, profile
        self.base = {"w": torch.tensor(0.0)}
        self.weights = dict(self.base)
        self.calls: list[int] = []
        self.refits = 0

    def run(self, inputs):
        batch = inputs["sample"].shape[0]
        if self.profile.max_batch is not None:
            assert self.profile.min_batch <= batch <= self.profile.max_batch
        self.calls.append(batch)
        return {"noise_pred": inputs["sample"] + self.weights["w"]}

    def refit(self, named_weights):
        self.refits += 1
        self.weights.update(named_weights)

    def restore(self):
        self.weights = dict(self.base)

    def info(self):
        return EngineInfo(Component.UNET, self.backend, "fp32", "cpu", self.profile)


def unet_inputs(batch: int, latent: int = 8, context: int = 77):
    return {
        "sample": torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 4, latent, latent).contiguous(),
        "timestep": torch.zeros(batch),
        "encoder_hidden_states": torch.zeros(batch, context, 32),
    }


def make_router(*profiles: ShapeProfile):
    compiled = [RecordingUNet(f"compiled{i}", p) for i, p in enumerate(profiles)]
    torch_engine = RecordingUNet("torch", ShapeProfile())
    fallbacks: list[str] = []
    router = RoutedEngine(Component.UNET, compiled, torch_engine, vae_scale_factor=8, on_fallback=fallbacks.append)
    return router, compiled, torch_engine, fallbacks


def test_picks_the_first_engine_whose_size_fits():
    router, (small, large), torch_engine, fallbacks = make_router(
        ShapeProfile(1, 4, ((64, 64),)), ShapeProfile(1, 4, ((128, 128),))
    )
    router.run(unet_inputs(2, latent=16))
    assert large.calls == [2] and not small.calls and router.last_backend == "compiled1"
    router.run(unet_inputs(2, latent=8))
    assert small.calls == [2]
    assert not fallbacks and not torch_engine.calls


def test_falls_back_to_torch_with_a_reason():
    router, (engine,), torch_engine, fallbacks = make_router(ShapeProfile(1, 4, ((64, 64),)))
    router.run(unet_inputs(1, latent=12))
    router.run(unet_inputs(1, latent=8, context=154))  # a two-chunk prompt
    assert torch_engine.calls == [1, 1] and not engine.calls
    assert fallbacks == ["no_profile", "context_length"]


def test_static_batches_are_padded_and_large_calls_split():
    router, (engine,), _, _ = make_router(ShapeProfile(4, 4, ((64, 64),)))
    out = router.run(unet_inputs(6))
    assert engine.calls == [4, 4]  # 4, then 2 padded to 4
    assert out["noise_pred"].shape[0] == 6
    assert torch.equal(out["noise_pred"][:, 0, 0, 0], torch.arange(6, dtype=torch.float32))


def test_refit_is_lazy_exact_and_never_blends():
    router, (engine,), torch_engine, _ = make_router(ShapeProfile(1, 4, ((64, 64),)))
    router.refit({"w": torch.tensor(10.0)})
    assert engine.refits == 0  # nothing runs yet, nothing is refitted
    assert router.run(unet_inputs(1))["noise_pred"][0, 0, 0, 0] == 10
    router.refit({"w": torch.tensor(20.0)})
    assert router.run(unet_inputs(1))["noise_pred"][0, 0, 0, 0] == 20
    router.refit({"w": torch.tensor(10.0)})
    assert router.run(unet_inputs(1))["noise_pred"][0, 0, 0, 0] == 10
    router.restore()
    assert router.run(unet_inputs(1))["noise_pred"][0, 0, 0, 0] == 0
    # the torch engine catches up the first time it is used
    router.refit({"w": torch.tensor(5.0)})
    assert router.run(unet_inputs(1, latent=12))["noise_pred"][0, 0, 0, 0] == 5
    assert torch_engine.refits == 1


class RecordingTextEncoder(Engine):
    def __init__(self, backend: str):
        self.backend, self.calls = backend, []

    def run(self, inputs):
        self.calls.append(sorted(inputs))
        return {"last_hidden_state": torch.zeros(inputs["input_ids"].shape[0], 77, 4)}

    def refit(self, named_weights):
        pass

    def restore(self):
        pass

    def info(self):
        return EngineInfo(Component.TEXT_ENCODER, self.backend, "fp32", "cpu", ShapeProfile())


def test_text_encoder_calls_with_injected_vectors_fall_back_with_reason_embeddings():
    compiled, torch_engine, fallbacks = RecordingTextEncoder("onnxruntime"), RecordingTextEncoder("torch"), []
    router = RoutedEngine(Component.TEXT_ENCODER, [compiled], torch_engine, vae_scale_factor=8, on_fallback=fallbacks.append)
    ids = torch.zeros(2, 77, dtype=torch.long)
    router.run({"input_ids": ids})
    assert compiled.calls == [["input_ids"]] and not fallbacks
    router.run({"input_ids": ids, "token_vectors": torch.zeros(2, 77, 4), "token_vector_mask": torch.zeros(2, 77, dtype=torch.bool)})
    assert torch_engine.calls == [["input_ids", "token_vector_mask", "token_vectors"]] and fallbacks == ["embeddings"]



class TimedUNet(RecordingUNet):
    """A RecordingUNet whose refit and run take at least the given seconds."""

    def __init__(self, profile: ShapeProfile, refit_s: float, run_s: float):
        super().__init__("compiled", profile)
        self.refit_s, self.run_s = refit_s, run_s

    def refit(self, named_weights):
        time.sleep(self.refit_s)
        super().refit(named_weights)

    def run(self, inputs):
        time.sleep(self.run_s)
        return super().run(inputs)


def test_schedule_refusal_compares_measured_refit_and_step_costs():
    """A weight schedule refits before every step: refused where the engine's measured refit of
    the request's set would take longer than its step; let through before anything is measured,
    and on an engine whose refit is shorter than a step."""
    shape = CallShape(2, 64, 64, 77)
    for refit_s, run_s, refused in ((0.05, 0.0, True), (0.0, 0.05, False)):
        compiled = TimedUNet(ShapeProfile(1, 4, ((64, 64),)), refit_s, run_s)
        router = RoutedEngine(Component.UNET, [compiled], RecordingUNet("torch", ShapeProfile()), vae_scale_factor=8)
        assert router.schedule_refusal(shape, 1) == ""  # nothing measured yet
        router.refit({"w": torch.tensor(1.0)})  # one element
        router.run(unet_inputs(2))  # one refit and one step measured
        reason = router.schedule_refusal(shape, 1)
        assert bool(reason) == refused, reason
        if refused:
            assert "compiled engine" in reason and "more than doubling" in reason
            # A call no compiled engine fits runs on torch, never refitted there: nothing measured.
            assert router.schedule_refusal(CallShape(2, 128, 128, 77), 1) == ""
