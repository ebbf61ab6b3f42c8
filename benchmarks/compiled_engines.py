"""Compiled engines against torch eager: latency, build time, refit switch time and memory, fidelity.

    python benchmarks/compiled_engines.py [--part tiny|real|all] [--work /tmp/impasto-bench]

One run prints a table per model: each backend's row beside torch eager fp32 (the baseline
diffusers users run on a CPU) and torch with bf16 autocast.
- tiny: the embedded default model (models/default) at its native size, with the shape
  judge's hit rate on a few prompts;
- real: an SD 1.5-architecture model with RANDOM weights built from its public config (no
  download): end to end at 256x256, 20 steps, batch 1 with guidance; single UNet steps at
  512x512 (batch 2: guidance). PSNR there compares numerics only (the images are noise).

Columns: `unet` one guided UNet step (batch 2), `e2e` one image (text encoder, all steps, VAE
decode), `build` the compiler's time for the folder (from its manifest, also when reused: see `--work`), `load` time
and RSS to load the engines, `switch` refit time from one LoRA-like weight set to another
(every attention / feed-forward / projection weight of the UNet), `refit MB` the RSS the
first refit adds (copies of the base weights kept for restore), `PSNR` end to end against
torch fp32 on the same inputs. The CPU is shared with other work: the load average is shown.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, commit, machine  # noqa: E402

from impasto.backends.base import ModelEngines  # noqa: E402
from impasto.backends.engine_folder import load_engine_folder  # noqa: E402
from impasto.backends.manifest import Manifest, Profile  # noqa: E402
from impasto.backends.torch_backend import load_model  # noqa: E402
from impasto.compiler.build import BuildRequest, compile_model  # noqa: E402
from impasto.compiler.onnx_export import vae_scale_factor  # noqa: E402
from impasto.compiler.parity import ImageRequest, generate, psnr, unet_step  # noqa: E402

LORA_TARGETS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "ff.net.0.proj.weight",
                "ff.net.2.weight", "proj_in.weight", "proj_out.weight")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def header() -> None:
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f" {f}" in flags]
    import onnxruntime
    import openvino

    print("# compiled engines vs torch eager")
    print(f"machine: {machine()}; {', '.join(isa)}; {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    print(f"commit:  {commit()}")
    print(f"versions: onnxruntime {onnxruntime.__version__}, openvino {openvino.get_version()}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (2 cores shared with other work)")
    print(flush=True)


class AutocastBF16:
    """Torch engines run under CPU bf16 autocast (weights stay fp32, matmuls/convs in bf16)."""

    def __init__(self, engines: ModelEngines):
        self._engines = engines
        for name in ("text_encoder", "unet", "vae_decoder"):
            setattr(self, name, _Autocast(getattr(engines, name)))


class _Autocast:
    def __init__(self, engine):
        self.engine = engine

    def run(self, inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.engine.run(inputs)


class FlushDenormals:
    """Torch engines run with denormals flushed to zero (`torch.set_flush_denormal`), to rule out
    x86's slow denormal path as the reason fp32 torch is slow on random weights. (A one-off
    check suggested 2x; the interleaved run measured 1.06x, so it is not the reason.)"""

    def __init__(self, engines: ModelEngines):
        for name in ("text_encoder", "unet", "vae_decoder"):
            setattr(self, name, _Flushed(getattr(engines, name)))


class _Flushed:
    def __init__(self, engine):
        self.engine = engine

    def run(self, inputs):
        torch.set_flush_denormal(True)
        try:
            return self.engine.run(inputs)
        finally:
            torch.set_flush_denormal(False)


@dataclass
class Row:
    label: str
    unet_s: float
    e2e_s: float
    build_s: float | None = None
    load_s: float | None = None
    load_mb: float | None = None
    switch_s: float | None = None
    refit_mb: float | None = None
    psnr_db: float | None = None
    hit_rate: float | None = None
    note: str = ""


def lora_like(unet_weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: w + 0.01 * torch.randn(w.shape, generator=generator)
            for name, w in unet_weights.items() if name.endswith(LORA_TARGETS)}


def time_unet(engines, request: ImageRequest, model_dir: Path, repeats: int, embeddings) -> float:
    from impasto.compiler.parity import initial_latents, noise_scheduler

    scheduler = noise_scheduler(model_dir)
    scheduler.set_timesteps(20)
    latents = initial_latents(request)
    t = scheduler.timesteps[0]
    unet_step(engines, latents, t, embeddings, 7.5, scheduler)  # warm-up (first-run allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unet_step(engines, latents, t, embeddings, 7.5, scheduler)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_switch(engines, weights_a, weights_b) -> tuple[float, float]:
    """(seconds to switch A -> B, MB the first refit added); leaves the engine restored."""
    before = rss_mb()
    engines.unet.refit(weights_a)
    grown = rss_mb() - before
    start = time.perf_counter()
    engines.unet.refit(weights_b)
    switch = time.perf_counter() - start
    engines.unet.restore()
    return switch, grown


def to_uint8(image: torch.Tensor):
    return ((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


@dataclass
class Case:
    model_dir: Path
    e2e: ImageRequest
    e2e_repeats: int
    unet_request: ImageRequest  # the size single UNet steps are timed at
    unet_repeats: int
    scaling: float
    judge_prompts: tuple[tuple[str, torch.Tensor], ...] = ()  # (prompt, its token ids)


def judge_hit_rate(engines, case: Case) -> float | None:
    if not case.judge_prompts:
        return None
    from impasto.models.judge import judge

    images = []
    for i, (prompt, ids) in enumerate(case.judge_prompts):
        request = ImageRequest(ids, case.e2e.uncond_ids, case.e2e.width, case.e2e.height, case.e2e.num_steps,
                               case.e2e.guidance_scale, seed=100 + i, vae_scale=case.e2e.vae_scale)
        images.append(to_uint8(generate(engines, request, case.model_dir, case.scaling)))
    return judge(images, [prompt for prompt, _ in case.judge_prompts]).hit_rate


def measure(label, engines, case: Case, reference_image, refit_sets=None, **extra) -> tuple[Row, torch.Tensor]:
    embeddings = engines.text_encoder.run({"input_ids": torch.cat([case.unet_request.uncond_ids, case.unet_request.input_ids])})["last_hidden_state"]
    unet_s = time_unet(engines, case.unet_request, case.model_dir, case.unet_repeats, embeddings)
    e2e_times, image = [], None
    for _ in range(case.e2e_repeats):
        start = time.perf_counter()
        image = generate(engines, case.e2e, case.model_dir, case.scaling)
        e2e_times.append(time.perf_counter() - start)
    row = Row(label, unet_s, statistics.median(e2e_times), **extra)
    row.psnr_db = psnr(image, reference_image) if reference_image is not None else None
    row.hit_rate = judge_hit_rate(engines, case)
    if refit_sets is not None:
        try:
            row.switch_s, row.refit_mb = time_switch(engines, *refit_sets)
        except KeyError as exc:  # int8 engines cannot refit their compressed weights
            row.note = (row.note + "; " if row.note else "") + f"no switch: {str(exc)[:60]}..."
    print(f"  measured {label}: unet {unet_s:.3f} s, e2e {row.e2e_s:.2f} s", file=sys.stderr, flush=True)
    return row, image


def build(case: Case, backend: str, precision: str, profiles, work: Path, components=None):
    kwargs = {"components": components} if components else {}
    request = BuildRequest(case.model_dir, backend, work / "engines", precision, tuple(profiles), **kwargs)
    result = compile_model(request, log=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    manifest = Manifest.read(result.folder)
    return result.folder, manifest.build_seconds  # the build's own time, also when this run reused it


def load(folder: Path, model_dir: Path, **options):
    gc.collect()
    before, start = rss_mb(), time.perf_counter()
    engines = load_engine_folder(folder, model_dir, **options)
    return engines, time.perf_counter() - start, rss_mb() - before


def fmt(value, spec, unit=""):
    return "-" if value is None else f"{value:{spec}}{unit}"


def print_table_header(title: str) -> None:
    print(f"## {title}")
    print("| engine | unet step | x | e2e image | x | build | load (s, MB) | switch | refit MB | PSNR dB | judge hits | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)


def print_row(r: Row, base: Row) -> None:
    """One table row; `x` columns are speed-ups over `base` (torch eager fp32)."""
    switch = None if r.switch_s is None else r.switch_s * 1000
    print(f"| {r.label} | {r.unet_s * 1000:.0f} ms | {base.unet_s / r.unet_s:.2f} | {r.e2e_s:.2f} s | {base.e2e_s / r.e2e_s:.2f} "
          f"| {fmt(r.build_s, '.0f', ' s')} | {fmt(r.load_s, '.1f')}, {fmt(r.load_mb, '.0f')} | {fmt(switch, '.1f', ' ms')} "
          f"| {fmt(r.refit_mb, '.0f')} | {fmt(r.psnr_db, '.1f')} | {fmt(r.hit_rate, '.0%')} | {r.note} |", flush=True)


def measure_variant(case: Case, variant, reference_image, work: Path, components) -> Row:
    """Build, load and measure one backend variant. Runs in its own process (see run_case)."""
    label, backend, precision, profiles, options, note = variant
    reference = load_model(case.model_dir)
    weights = reference.unet.named_weights()
    refit_sets = (lora_like(weights, 1), lora_like(weights, 2))
    del reference, weights
    gc.collect()
    folder, build_s = build(case, backend, precision, profiles, work, components)
    engines, load_s, load_mb = load(folder, case.model_dir, **options)
    row, _ = measure(label, engines, case, reference_image, refit_sets,
                     build_s=build_s, load_s=load_s, load_mb=load_mb, note=note)
    return row


def run_case(title: str, case: Case, variants, work: Path, components=None) -> None:
    """variants: (label, backend, precision, profiles, load options, note).

    Each compiled variant runs in a fresh process: the real-size engines hold several GB,
    and one process measuring them all in turn ran out of memory.
    """
    import multiprocessing

    print(f"{title}: torch", file=sys.stderr, flush=True)
    reference = load_model(case.model_dir)
    weights = reference.unet.named_weights()
    refit_sets = (lora_like(weights, 1), lora_like(weights, 2))
    print_table_header(title)
    base, reference_image = measure("torch eager fp32", reference, case, None, refit_sets)
    print_row(base, base)
    row, _ = measure("torch bf16 autocast", AutocastBF16(reference), case, reference_image)
    print_row(row, base)
    del reference, weights, refit_sets
    gc.collect()
    spawn = multiprocessing.get_context("spawn")
    for variant in variants:
        print(f"{title}: {variant[0]}", file=sys.stderr, flush=True)
        try:
            with spawn.Pool(1) as pool:
                row = pool.apply(measure_variant, (case, variant, reference_image, work, components))
            print_row(row, base)
        except Exception as exc:  # one failing backend must not hide the others' figures
            print(f"| {variant[0]} | failed: {type(exc).__name__}: {str(exc)[:200]} |", flush=True)
    print()


def tiny_case() -> Case:
    from transformers import CLIPTokenizer

    from impasto.models import default_model_path

    model_dir = default_model_path()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")

    def tokenize(text):
        return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    scale = vae_scale_factor(load_model(model_dir).vae_decoder.module)
    size = 64
    prompts = ("a red circle", "a blue square", "a green triangle", "a red square")
    e2e = ImageRequest(tokenize(prompts[0]), tokenize(""), size, size, 20, vae_scale=scale)
    scaling = load_model(model_dir).vae_decoder.module.config.scaling_factor
    return Case(model_dir, e2e, 2, e2e, 5, scaling, tuple((p, tokenize(p)) for p in prompts))


def build_sd15_random(folder: Path) -> Path:
    """SD 1.5's architecture from its public config, random weights, saved like a diffusers folder."""
    import json

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # defaults = SD 1.5
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    del unet
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=512)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def real_case(work: Path, steps: int) -> Case:
    model_dir = build_sd15_random(work / "sd15-random")
    generator = torch.Generator().manual_seed(0)

    def tokenize(text):
        ids = torch.full((1, 77), 49407, dtype=torch.int64)
        ids[0, 0] = 49406
        if text:
            ids[0, 1:8] = torch.randint(1000, 40000, (7,), generator=generator)
        return ids

    e2e = ImageRequest(tokenize("prompt"), tokenize(""), 256, 256, steps)
    unet_request = ImageRequest(e2e.input_ids, e2e.uncond_ids, 512, 512, 1)
    return Case(model_dir, e2e, 1, unet_request, 2, 0.18215)


def interleaved_unet_steps(case: Case, work: Path, rounds: int) -> None:
    """Guided UNet steps at the e2e size, torch fp32 / torch bf16 autocast / OpenVINO bf16 taken
    in turn, `rounds` times: on a CPU shared with other work, alternating is what makes the
    ratios comparable (each engine sees the same load). OpenVINO gets a one-profile folder
    (256x256, batch 2) so that torch and it fit in memory together."""
    from impasto.backends.base import Component

    reference = load_model(case.model_dir)
    embeddings = reference.text_encoder.run({"input_ids": torch.cat([case.e2e.uncond_ids, case.e2e.input_ids])})["last_hidden_state"]
    contenders = {"torch eager fp32": reference, "torch eager fp32, denormals flushed": FlushDenormals(reference),
                  "torch bf16 autocast": AutocastBF16(reference)}
    components = (Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER)
    folder, _ = build(case, "openvino", "bf16", [Profile(case.e2e.width, case.e2e.height, 2, 2)], work, components)
    contenders["openvino bf16"] = load_engine_folder(folder, case.model_dir)
    times = {label: [] for label in contenders}
    for _ in range(rounds):
        for label, engines in contenders.items():
            times[label].append(time_unet(engines, case.e2e, case.model_dir, 1, embeddings))
    print(f"## interleaved guided UNet steps at {case.e2e.width}x{case.e2e.height} ({rounds} rounds, median)")
    print("| engine | unet step | x vs torch fp32 | all rounds |")
    print("|---|---|---|---|")
    base = statistics.median(times["torch eager fp32"])
    for label, values in times.items():
        median = statistics.median(values)
        print(f"| {label} | {median * 1000:.0f} ms | {base / median:.2f} | {', '.join(f'{v:.2f}' for v in values)} s |")
    print(flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("tiny", "real", "interleaved", "all"), default="all")
    parser.add_argument("--work", type=Path, default=Path("/tmp/impasto-bench"), help="model and engine folders (reused across runs)")
    parser.add_argument("--steps", type=int, default=20, help="real-size end-to-end steps")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved real-size UNet comparison")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    header()
    if args.part in ("tiny", "all"):
        case = tiny_case()
        size = case.e2e.width
        one, two = Profile(size, size, 1, 1), Profile(size, size, 2, 2)
        variants = [
            ("onnxruntime fp32", "onnxruntime", "fp32", [Profile(size, size, 1, 2)], {}, "override refit"),
            ("onnxruntime fp32 (weights as inputs)", "onnxruntime", "fp32", [Profile(size, size, 1, 2)], {"refit_mode": "inputs"}, ""),
            ("openvino fp32", "openvino", "fp32", [one, two], {}, "parameters refit"),
            ("openvino fp32 (recompile refit)", "openvino", "fp32", [one, two], {"refit_mode": "recompile"}, ""),
            ("openvino bf16", "openvino", "bf16", [one, two], {}, ""),
            ("openvino int8 weights (bf16)", "openvino", "int8", [one, two], {}, "refit: uncompressed weights only"),
        ]
        run_case(f"default model (models/default), {size}x{size}, 20 steps, batch 1 + guidance", case, variants, args.work)
    if args.part in ("real", "all"):
        case = real_case(args.work, args.steps)
        profiles = [Profile(256, 256, 1, 1), Profile(256, 256, 2, 2), Profile(512, 512, 2, 2)]
        from impasto.backends.base import Component

        components = (Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER)
        variants = [
            ("openvino bf16", "openvino", "bf16", profiles, {}, "parameters refit"),
            ("openvino int8 weights (bf16)", "openvino", "int8", profiles, {}, "refit: uncompressed weights only"),
            ("openvino fp32", "openvino", "fp32", profiles, {}, "parameters refit"),
            ("onnxruntime fp32", "onnxruntime", "fp32", profiles[:1], {}, "override refit"),
            ("onnxruntime fp32 (weights as inputs)", "onnxruntime", "fp32", profiles[:1], {"refit_mode": "inputs"}, ""),
            ("openvino bf16 (recompile refit)", "openvino", "bf16", profiles, {"refit_mode": "recompile"}, ""),
        ]
        run_case(f"SD 1.5 architecture, random weights: e2e 256x256 {args.steps} steps; unet step 512x512", case, variants,
                 args.work, components)
    if args.part in ("interleaved", "all"):
        interleaved_unet_steps(real_case(args.work, args.steps), args.work, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
