"""LoRA switch time: our refit (merged weights cached / composed) vs diffusers' load + fuse and set_adapters,
on the torch engine and on each compiled backend; and what a per-step weight schedule costs.

    python benchmarks/lora_switch.py [--no-sd15] [--no-compiled] [--repeats N] [--threads 1,2] [--device cpu|cuda]
                                     [--work DIR] [--timeout S]

Two models:
- the embedded default model (tiny SD 1.x): a peft LoRA (rank 4) on its UNet attention, conv and
  feed-forward layers;
- a real-size SD 1.5 UNet (SD 1.5's config: `UNet2DConditionModel(sample_size=64,
  cross_attention_dim=768)`, random weights, seed 0: the weights' values do not change the cost):
  a rank-16 peft LoRA on to_q/to_k/to_v/to_out.0 of every attention. The compiled rows need a
  model folder: `compiled_engines.build_sd15_random` writes it (the same UNet) into the work folder.

Both sides get the UNet only. A switch changes only UNet weights, and diffusers' pipeline-level
`load_lora_weights` on a UNet-only file does the same work (state-dict conversion, peft
injection into the UNet) plus a text-encoder pass that finds nothing, so UNet-level
`load_lora_adapter` + `fuse_lora` is the fair (and faster) diffusers baseline.

What a "switch" is on each side (from adapter A applied to adapter B applied):
- ours, cached: `EngineAdapters.apply([(B, w)])` with B's merged weights in the DeltaCache:
  one `copy_` per target weight through `Engine.refit`;
- ours, uncached: the same with a cache too small to keep B, which is also what a set's first
  use costs (a set is kept from its second use on): B's merged weights are computed straight
  into the engine's parameters (`merge_into` through `TorchUNet.refit_in_place`: one addmm per
  weight from the pristine base, no merged tensors, no copy);
- ours, cache miss, kept: a cache with room that does not hold B (cleared before each switch),
  B used before: a set's second use. B's merged weights are computed in the engine (as above),
  then each copied out to a new tensor for the cache. What it costs over the first use is that
  copy, into new memory: a page fault per 4 KiB (SD 1.5's 357 MB on one thread: ~125 ms, against
  ~25 ms into memory in use), unless the allocator hands back the memory the cleared entry just
  freed, so this row varies from run to run (SD 1.5, 1 thread: 66 to 220 ms);
- ours, cache miss, kept, cache full: a cache that holds one set, so each switch evicts the
  other (the steady state of a full cache): the same, but the copies go into the evicted
  entry's tensors (nothing else holds them), so no new memory: about first use + one copy.
The torch rows drive the bare torch engine. The server wraps it in the engine router, which
passes `refit_in_place` through when torch is the only engine.
- compiled backends (onnxruntime, OpenVINO; TensorRT where there is an NVIDIA GPU): the server's
  path (lora_engines.py): `EngineAdapters` over a `RoutedEngine` whose first engine is the
  compiled UNet (built by the project's compiler, one static profile: the step's size, batch 2)
  and whose fallback is the torch UNet (the base weights' source). Cached: the merged weights
  from the cache, then the router's lazy `restore()` + `refit()` of the compiled engine. First
  use: the merge (new tensors: the router has no in-place refit beside compiled engines) and
  the same refit; with compiled engines a set is kept from its first use, so its second use is
  the cached row. Each backend runs in its own process, at the largest --threads count (torch
  and the runtime alike), and its ratio is against diffusers at that count.
- diffusers load + fuse: `unfuse_lora(); unload_lora()` of A, then
  `load_lora_adapter(B's file)`, `fuse_lora()`: what a server that fuses would do per switch;
- diffusers set_adapters: A and B both loaded unfused, `set_adapters(["b"])`: cheap, but every
  step then pays the unfused LoRA branches (the "step, unfused" column).
Step latency: one UNet call at CFG batch 2 (default model at its default size; SD 1.5 at
256x256 on a CPU, 512x512 on a GPU), with the adapter fused (= base cost, what refit gives;
a compiled row: its engine) and unfused (peft layers active).

Weight schedule (second table): a request whose adapter weight changes with the step fraction
(`<lora:name:0@0,1@0.5>`) makes a new set at every step; the server merges it (not kept) and
refits before each step. Per-step overhead = that merge + refit (20 steps of a 0..1 ramp,
median), against the UNet step itself. diffusers' runtime-LoRA equivalent is `set_adapters`
with the step's weight, then an unfused step: its overhead is set_adapters plus what the unfused
branches add (timed in pairs against the same step with the LoRA layers disabled).

Threads: each thread count in --threads is a separate set of torch rows (both sides at the same
count). On a shared, loaded CPU torch's intra-op pool costs milliseconds per small op
(synchronisation with busy cores), which dominates the tiny model's ~100 small copies; one
thread shows the cost of the work itself.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_engines  # noqa: E402
from bench_common import print_header, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
SD15_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Median seconds of `repeats` calls (after one warm-up)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ms(s: float) -> str:
    return f"{s * 1000:.1f}"


def make_lora_file(unet, folder: Path, targets, rank: int, seed: int) -> Path:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    # Injected in place and unloaded after (peft puts the original modules back): no second
    # copy of a 3.4 GB UNet.
    peft_unet = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_unet.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    sd = {k.removeprefix("base_model.model."): v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(peft_unet).items()}
    peft_unet.unload()
    del peft_unet
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=sd)
    return folder / "pytorch_lora_weights.safetensors"


@dataclass
class Figures:
    """One model's torch and diffusers figures (at one thread count)."""

    shape: str  # the model column
    load_fuse_s: float
    step_fused_s: float
    rows: list[list[object]] = field(default_factory=list)
    schedule_rows: list[list[object]] = field(default_factory=list)


def bench_model(shape: str, unet, sample_hw: tuple[int, int], files: dict[str, Path], repeats: int, device: str) -> Figures:
    from impasto.backends.torch_backend import TorchUNet
    from impasto.core.adapter_weights import EngineAdapters
    from impasto.lora import DeltaCache, load_adapter
    from safetensors.torch import load_file

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    adapters = {n: load_adapter(p) for n, p in files.items()}

    # --- ours --- (the engine wraps `unet` itself; restore() hands it back bit-exact for diffusers)
    engine = TorchUNet(unet, device=device)
    ours = {}
    one_set = 0  # bytes of one set's merged weights (A and B target the same weights)
    for name, cache_bytes in (("cached", 1 << 40), ("uncached", 0), ("kept", 1 << 40), ("kept_full", None)):
        state = EngineAdapters(engine, "unet", DeltaCache(one_set if cache_bytes is None else cache_bytes), "bench")
        flip = {"next": "a"}

        def switch():
            flip["next"] = "b" if flip["next"] == "a" else "a"
            if name == "kept":
                state.cache.clear()
            state.apply([(adapters[flip["next"]], 1.0)])

        for _ in range(2):  # every set used twice: kept from its second use on (a doorkeeper)
            switch()
            switch()
        ours[name] = timed(switch, repeats, sync)
        if name == "cached":
            one_set = state.cache.nbytes // 2
        state.apply([])

    # --- a weight schedule: a new weight each step, merged into the engine, not kept ---
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 40), "bench")
    ramp = iter([(i + 1) / lora_engines.SCHEDULE_STEPS for i in range(lora_engines.SCHEDULE_STEPS + 1)])
    schedule_s = timed(lambda: state.apply([(adapters["a"], next(ramp))], keep=False), lora_engines.SCHEDULE_STEPS, sync)
    state.apply([])

    # --- step latency: fused (what refit leaves: plain weights) ---
    h, w = sample_hw
    inputs = {
        "sample": torch.randn(2, unet.config.in_channels, h, w),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim),
    }
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 40), "bench")
    state.apply([(adapters["a"], 1.0)])
    step_fused = timed(lambda: engine.run(inputs), max(2, repeats // 3), sync)
    state.apply([])
    del engine, state

    # --- diffusers ---
    d_unet = unet.to(device)
    sds = {n: load_file(str(p)) for n, p in files.items()}  # read once: the file read is not what we compare
    current = {"name": None}

    def load_fuse():
        nxt = "b" if current["name"] == "a" else "a"
        if current["name"] is not None:
            d_unet.unfuse_lora()
            d_unet.unload_lora()
        d_unet.load_lora_adapter(dict(sds[nxt]), prefix="unet", adapter_name=nxt)
        d_unet.fuse_lora(lora_scale=1.0)
        current["name"] = nxt

    load_fuse_s = timed(load_fuse, repeats, sync)
    d_unet.unfuse_lora()
    d_unet.unload_lora()
    for n in ("a", "b"):
        d_unet.load_lora_adapter(dict(sds[n]), prefix="unet", adapter_name=n)
    flip = {"next": "a"}

    def set_adapters():
        flip["next"] = "b" if flip["next"] == "a" else "a"
        d_unet.set_adapters([flip["next"]], weights=[1.0])

    set_adapters_s = timed(set_adapters, repeats, sync)

    def step():
        with torch.inference_mode():
            d_unet(inputs["sample"].to(device), inputs["timestep"].to(device), encoder_hidden_states=inputs["encoder_hidden_states"].to(device), return_dict=False)

    # The unfused step and the same step with the LoRA layers disabled, in pairs: what the
    # unfused branches add is a few percent of a real-size step, less than a loaded CPU's drift
    # between two separately timed medians.
    pairs = []
    for _ in range(max(3, repeats // 3) + 1):  # the first pair warms up
        t0 = time.perf_counter()
        step()
        sync()
        t1 = time.perf_counter()
        d_unet.disable_lora()
        step()
        sync()
        t2 = time.perf_counter()
        d_unet.enable_lora()
        pairs.append((t1 - t0, (t1 - t0) - (t2 - t1)))
    step_unfused = statistics.median(p[0] for p in pairs[1:])
    unfused_extra = statistics.median(p[1] for p in pairs[1:]) + set_adapters_s
    d_unet.unload_lora()

    figures = Figures(shape, load_fuse_s, step_fused)
    figures.rows = [
        [shape, "ours: refit, merged weights cached", ms(ours["cached"]), f"{load_fuse_s / ours['cached']:.0f}x", ms(step_fused)],
        [shape, "ours: refit, composed in the engine (first use)", ms(ours["uncached"]), f"{load_fuse_s / ours['uncached']:.0f}x", ms(step_fused)],
        [shape, "ours: refit, composed and kept (second use)", ms(ours["kept"]), f"{load_fuse_s / ours['kept']:.0f}x", ms(step_fused)],
        [shape, "ours: refit, composed and kept, cache full", ms(ours["kept_full"]), f"{load_fuse_s / ours['kept_full']:.0f}x", ms(step_fused)],
        [shape, "diffusers: unfuse+unload, load_lora_adapter+fuse_lora", ms(load_fuse_s), "1x", ms(step_fused)],
        [shape, "diffusers: set_adapters (both loaded, unfused)", ms(set_adapters_s), f"{load_fuse_s / set_adapters_s:.0f}x", ms(step_unfused)],
    ]
    figures.schedule_rows = [
        [shape, "torch: merged into the engine each step", ms(schedule_s), ms(schedule_s), "-", ms(step_fused), f"{schedule_s / step_fused:.2f}", "runs"],
        [shape, "diffusers: set_adapters each step + unfused step", ms(unfused_extra), "-", "-", ms(step_fused), f"{unfused_extra / step_fused:.2f}", "(not the server)"],
    ]
    return figures


def lora_files(unet, folder: Path, targets, rank: int) -> dict[str, Path]:
    return {n: make_lora_file(unet, folder / n, targets, rank, seed) for n, seed in (("a", 1), ("b", 2))}


def describe(label: str, unet, files: dict[str, Path], rank: int) -> str:
    from impasto.lora import load_adapter

    modules = load_adapter(files["a"]).modules
    names = {t.removeprefix("unet.") for t in modules}
    merged_mb = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if n.removesuffix(".weight") in names) / 2**20
    return f"{label} ({len(modules)} targets, rank {rank}, {merged_mb:.0f} MB of weights)"


def compiled_rows(figures: Figures, job_of, reason_all: str, timeout_s: float) -> None:
    """Each backend's switch and schedule rows, appended to `figures` (a row says why when a
    backend cannot run)."""
    for variant in lora_engines.variants():
        why = f"skipped: {variant.skip or reason_all}" if variant.skip or reason_all else ""
        if not why:
            print(f"  {figures.shape}: {variant.label} ...", file=sys.stderr, flush=True)
            try:
                result = lora_engines.run(job_of(variant), timeout_s)
            except RuntimeError as exc:
                why = f"failed: {exc}"
        if why:
            figures.rows.append([figures.shape, f"{variant.label}: {why}", "-", "-", "-"])
            figures.schedule_rows.append([figures.shape, f"{variant.label}: {why.partition(':')[0]}", "-", "-", "-", "-", "-", "-"])
            continue
        built = f"build {result.build_s:.0f} s{', reused' if result.reused else ''}"
        ratio = figures.load_fuse_s
        figures.rows += [
            [figures.shape, f"{variant.label}: refit, merged weights cached ({built})", ms(result.cached_s), f"{ratio / result.cached_s:.0f}x", ms(result.step_s)],
            [figures.shape, f"{variant.label}: refit, merged on first use", ms(result.first_use_s), f"{ratio / result.first_use_s:.0f}x", ms(result.step_s)],
        ]
        overhead = result.schedule_merge_s + result.schedule_refit_s
        figures.schedule_rows.append(
            [figures.shape, f"{variant.label}: merge + refit each step", ms(overhead), ms(result.schedule_merge_s), ms(result.schedule_refit_s),
             ms(result.step_s), f"{overhead / result.step_s:.2f}", schedule_verdict(result.schedule_refit_s, result.step_s)]
        )


def schedule_verdict(refit_s: float, step_s: float) -> str:
    """What the server does with a scheduled request on that engine (its rule, on these figures)."""
    from impasto.core.engine_router import schedule_too_slow

    return "refused" if schedule_too_slow(refit_s, step_s) else "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-sd15", action="store_true", help="only the default model")
    parser.add_argument("--no-compiled", action="store_true", help="torch and diffusers rows only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default=str(torch.get_num_threads()), help="comma-separated torch thread counts, e.g. 1,2")
    parser.add_argument("--work", type=Path, help="engine and model folders, reused across runs (default: a temporary folder, removed)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per compiled backend (build included)")
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from impasto.models import default_model_path

    # Loading the second adapter beside the first makes diffusers list the first's keys as
    # "missing" (they are in the model, not in that file): noise for this benchmark.
    diffusers_logging.set_verbosity_error()
    threads = [int(t) for t in args.threads.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="lora_switch_"))
    work.mkdir(parents=True, exist_ok=True)
    compiled_reason = "--no-compiled" if args.no_compiled else ("compiled rows run on the CPU (--device cpu)" if args.device != "cpu" else "")
    print_header("LoRA switch: refit vs diffusers (UNet only)")
    print(f"compiled engines: built by the project's compiler into {work}; memory available at start: {lora_engines.mem_available_gib():.1f} GiB\n", flush=True)
    rows, schedule_rows = [], []
    try:
        tiny_dir = Path(default_model_path())
        files = None
        for n in threads:
            torch.set_num_threads(n)
            tiny = UNet2DConditionModel.from_pretrained(tiny_dir / "unet").eval()
            files = files or lora_files(tiny, work / "lora-default", TINY_TARGETS, 4)
            size = tiny.config.sample_size
            figures = bench_model(describe(f"default model, {n} thr", tiny, files, 4), tiny, (size, size), files, args.repeats, args.device)
            if n == max(threads):
                compiled_rows(figures, lambda v: lora_engines.Job(v, tiny_dir, work, files, (size, size), args.repeats, n), compiled_reason, args.timeout)
            rows += figures.rows
            schedule_rows += figures.schedule_rows
            del tiny
        if not args.no_sd15:
            n = max(threads)
            torch.set_num_threads(n)
            hw = (64, 64) if args.device.startswith("cuda") else (32, 32)
            if compiled_reason:
                torch.manual_seed(0)
                sd15_dir = None
                sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()  # build_sd15_random's UNet
            else:
                from compiled_engines import build_sd15_random

                sd15_dir = build_sd15_random(work / "sd15-random")
                sd15 = UNet2DConditionModel.from_pretrained(sd15_dir / "unet").eval()
            files = lora_files(sd15, work / "lora-sd15", SD15_TARGETS, 16)
            unet_bytes = sum(p.numel() * p.element_size() for p in sd15.parameters())
            shape = describe(f"SD 1.5 UNet, latent {hw[0]}x{hw[1]}, {n} thr", sd15, files, 16)
            figures = bench_model(shape, sd15, hw, files, max(3, args.repeats // 3), args.device)
            del sd15
            gc.collect()
            reason = compiled_reason or lora_engines.sd15_memory_reason(unet_bytes)
            compiled_rows(figures, lambda v: lora_engines.Job(v, sd15_dir, work, files, hw, max(3, args.repeats // 3), n), reason, args.timeout)
            rows += figures.rows
            schedule_rows += figures.schedule_rows
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(["model", "switch", "switch ms (median)", "vs load+fuse", "UNet step ms (CFG batch 2)"], rows)
    print("step column: fused rows = plain weights (what refit leaves; a compiled row: its engine); set_adapters row = peft layers active, unfused.")
    print("ratios: against diffusers' load+fuse of the same model at the same thread count, in this run.\n")
    print("## weight schedule: per-step cost of a weight that changes every step")
    print_table(["model", "engine", "overhead ms/step", "merge ms", "refit ms", "UNet step ms", "overhead / step", "server"], schedule_rows)
    print("overhead: what a scheduled weight adds to each step (torch: merged into the engine; compiled: merged into new tensors,")
    print("then the engine's restore + refit; diffusers: set_adapters + the unfused branches). server: what the server does")
    print("with such a request on that engine: refused when the engine's refit takes longer than its step (engine_router.schedule_too_slow;")
    print("the server measures both itself). Torch alone merges in place: never refused.")


if __name__ == "__main__":
    main()
