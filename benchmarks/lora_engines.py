"""Compiled-engine rows of benchmarks/lora_switch.py: a LoRA switch, and a weight schedule's
per-step cost, on each backend, measured the way the server does them.

On compiled engines the server's UNet is a `RoutedEngine` (the compiled engine first, the torch
engine as the fallback and as the source of base weights) wrapped by `EngineAdapters`. A switch
is `EngineAdapters.apply(set)` (merged weights from the DeltaCache, or merged from the torch
engine's pristine copies into new tensors: the router offers no in-place refit when compiled
engines are loaded) and then, lazily, the router bringing the compiled engine up to date before
its next run: `restore()`, then `refit(every wanted weight)`. Both halves are timed here.

Each backend runs in its own (spawned) process: it builds its UNet engine with the project's
compiler (`compile_model`, UNet only, one static profile: the size and CFG batch 2 of the torch
rows; reused when the work folder already holds it), loads it, and measures. A real-size
engine holds gigabytes; a crash or an out-of-memory kill in one backend becomes that row's
reason, not a hung benchmark.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

SCHEDULE_STEPS = 20  # a schedule's weight at each of 20 steps: a new set at every step


@dataclass(frozen=True)
class Variant:
    label: str
    backend: str
    precision: str
    skip: str = ""  # why it cannot run here (the row says so instead of a figure)


def variants() -> list[Variant]:
    from impasto.backends.availability import backend_status

    found = []
    ort = backend_status("onnxruntime")
    found.append(Variant("onnxruntime fp32", "onnxruntime", "fp32", "" if ort.available else ort.reason))
    ov = backend_status("openvino")
    found.append(Variant("openvino fp32", "openvino", "fp32", "" if ov.available else ov.reason))
    bf16 = ov.reason
    if ov.available:
        from impasto.compiler.openvino_build import cpu_has

        bf16 = "" if cpu_has("BF16") else "this CPU has no bf16 compute (OpenVINO OPTIMIZATION_CAPABILITIES)"
    found.append(Variant("openvino bf16", "openvino", "bf16", bf16))
    trt = backend_status("tensorrt")
    found.append(Variant("tensorrt fp16", "tensorrt", "fp16", "" if trt.available else f"needs an NVIDIA GPU ({trt.reason})"))
    return found


@dataclass(frozen=True)
class Job:
    variant: Variant
    model_dir: Path
    work: Path
    lora_files: dict[str, Path]
    sample_hw: tuple[int, int]  # latent size
    repeats: int
    threads: int


@dataclass
class Result:
    build_s: float  # the compiler's own time (from the manifest, also when reused)
    reused: bool
    cached_s: float  # switch, merged weights in the cache: restore + refit
    first_use_s: float  # switch, merged from the base (not kept): merge + restore + refit
    schedule_merge_s: float  # per step of a schedule: the merge (apply, keep=False)
    schedule_refit_s: float  # per step of a schedule: the compiled engine's restore + refit
    step_s: float  # one UNet call at CFG batch 2 with the adapter fused


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def load_unet_engine(folder: Path, threads: int):
    """The folder's UNet engine, built as the backend's `load_engines` does, with a thread count
    (the server's engines use the runtime's default: every core)."""
    from impasto.backends.base import Component
    from impasto.backends.manifest import Manifest, shape_profile

    manifest = Manifest.read(folder)
    artifact = manifest.components[Component.UNET]
    profile = shape_profile(manifest.profiles, manifest.dynamic_shapes)
    path = folder / artifact.files[0]
    if manifest.backend == "onnxruntime":
        from impasto.backends.onnxruntime_backend import OnnxRuntimeEngine

        return OnnxRuntimeEngine(Component.UNET, path, artifact.refit, manifest.precision, profile, "cpu", num_threads=threads), manifest
    if manifest.backend == "openvino":
        from impasto.backends.openvino_backend import OpenVINOEngine

        hint = manifest.options.get("inference_precision", "f32")
        return OpenVINOEngine(Component.UNET, path, artifact.refit, manifest.precision, manifest.profiles, profile, hint,
                              manifest.vae_scale_factor, num_threads=threads), manifest
    from impasto.backends.tensorrt_backend import load_engines

    return load_engines(folder, manifest, "cuda")[Component.UNET], manifest


def measure(job: Job) -> Result:
    """Build, load and measure one backend (in a fresh process: see `run`)."""
    from diffusers import UNet2DConditionModel

    from impasto.backends.base import Component
    from impasto.backends.manifest import Profile
    from impasto.backends.torch_backend import TorchUNet
    from impasto.compiler.build import BuildRequest, compile_model
    from impasto.core.adapter_weights import EngineAdapters
    from impasto.core.engine_router import RoutedEngine
    from impasto.lora import DeltaCache, load_adapter

    torch.set_num_threads(job.threads)
    h, w = job.sample_hw
    vae = json.loads((job.model_dir / "vae" / "config.json").read_text())
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)  # as compiler.onnx_export.vae_scale_factor
    profile = Profile(w * vae_scale, h * vae_scale, 2, 2)
    request = BuildRequest(job.model_dir, job.variant.backend, job.work / "engines", job.variant.precision, (profile,), (Component.UNET,))
    built = compile_model(request, log=lambda message: None)
    gc.collect()
    compiled, manifest = load_unet_engine(built.folder, job.threads)
    # The server's torch engine of the model: the fallback, and where base weights come from.
    unet = UNet2DConditionModel.from_pretrained(job.model_dir / "unet").eval()
    router = RoutedEngine(Component.UNET, [compiled], TorchUNet(unet), manifest.vae_scale_factor)
    adapters = {n: load_adapter(p) for n, p in job.lora_files.items()}

    def bring_up_to_date():
        # What the router does before the compiled engine's next run (refit is lazy).
        router._bring_up_to_date(compiled)

    switch_s = {}
    for name, cache_bytes in (("cached", 1 << 40), ("first use", 0)):
        state = EngineAdapters(router, "unet", DeltaCache(cache_bytes), "bench")
        flip = {"next": "a"}

        def switch(state=state, flip=flip):
            flip["next"] = "b" if flip["next"] == "a" else "a"
            state.apply([(adapters[flip["next"]], 1.0)])
            bring_up_to_date()

        for _ in range(4):  # every set used twice first (kept from its second use on)
            switch()
        switch_s[name] = median_seconds(switch, job.repeats)
        state.apply([])
        bring_up_to_date()

    # A weight schedule: a new weight at every step, each set merged (not kept) and refitted.
    state = EngineAdapters(router, "unet", DeltaCache(1 << 40), "bench")
    merge_times, refit_times = [], []
    for step in range(SCHEDULE_STEPS + 1):
        t0 = time.perf_counter()
        state.apply([(adapters["a"], (step + 1) / SCHEDULE_STEPS)], keep=False)
        t1 = time.perf_counter()
        bring_up_to_date()
        t2 = time.perf_counter()
        if step:  # the first is a warm-up
            merge_times.append(t1 - t0)
            refit_times.append(t2 - t1)

    state.apply([(adapters["a"], 1.0)])
    inputs = {
        "sample": torch.randn(2, unet.config.in_channels, h, w),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim),
    }
    step_s = median_seconds(lambda: router.run(inputs), max(2, job.repeats // 3))
    assert router.last_backend == job.variant.backend, f"the step ran on {router.last_backend}"
    return Result(manifest.build_seconds, built.reused, switch_s["cached"], switch_s["first use"],
                  statistics.median(merge_times), statistics.median(refit_times), step_s)


def run(job: Job, timeout_s: float) -> Result:
    """`measure` in a spawned process; raises RuntimeError with the reason if it fails or dies."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        future = pool.submit(_measure_or_reason, job)
        try:
            outcome = future.result(timeout=timeout_s)
        except BrokenProcessPool:
            raise RuntimeError(f"the process died (out of memory? {mem_available_gib():.1f} GiB available now)") from None
        except TimeoutError:
            for process in pool._processes.values():  # our own child: the pool has no cancel for a running task
                process.kill()
            raise RuntimeError(f"took over {timeout_s:.0f} s") from None
    if isinstance(outcome, str):
        raise RuntimeError(outcome)
    return outcome


def _measure_or_reason(job: Job) -> Result | str:
    try:
        return measure(job)
    except Exception as exc:  # the reason goes back as text: some exceptions do not pickle
        traceback.print_exc()
        return f"{type(exc).__name__}: {str(exc)[:300]}"


def sd15_memory_reason(unet_bytes: int) -> str:
    """Why an SD 1.5 backend cannot run here, or "". Peak: the compiler's model and its ONNX
    export (about two UNets), then the engine's own weights beside the torch base (two UNets)."""
    need = 2.5 * unet_bytes / 2**30 + 2
    have = mem_available_gib()
    return "" if have >= need else f"needs about {need:.0f} GiB free, {have:.1f} GiB available"
