"""LoRA switch time: our refit (merged weights cached / composed) vs diffusers' load + fuse and set_adapters.

    python benchmarks/lora_switch.py [--no-sd15] [--repeats N] [--threads 1,2] [--device cpu|cuda]

Two models:
- the embedded default model (tiny SD 1.x): a peft LoRA (rank 4) on its UNet attention, conv and
  feed-forward layers;
- a real-size SD 1.5 UNet (`UNet2DConditionModel()` defaults, random weights: the weights' values
  do not change the cost): a rank-16 peft LoRA on to_q/to_k/to_v/to_out.0 of every attention.

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
  B used before: B's merged weights are built as new tensors, put in the cache, and copied in
  by refit: a set's second use.
All "ours" rows drive the bare torch engine. The server wraps it in the engine router, which
passes `refit_in_place` through when torch is the only engine (with compiled engines the
router needs the full values, and the "kept" path without the cache put is taken).
- diffusers load + fuse: `unfuse_lora(); unload_lora()` of A, then
  `load_lora_adapter(B's file)`, `fuse_lora()`: what a server that fuses would do per switch;
- diffusers set_adapters: A and B both loaded unfused, `set_adapters(["b"])`: cheap, but every
  step then pays the unfused LoRA branches (the "step, unfused" column).
Step latency: one UNet call at CFG batch 2 (default model at its default size; SD 1.5 at
256x256 on a CPU, 512x512 on a GPU), with the adapter fused (= base cost, what refit gives) and
unfused (peft layers active).

Threads: each thread count in --threads is a separate set of rows (both sides at the same
count). On a shared, loaded CPU torch's intra-op pool costs milliseconds per small op
(synchronisation with busy cores), which dominates the tiny model's ~100 small copies; one
thread shows the cost of the work itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import print_header, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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


def bench_model(label: str, unet, sample_hw: tuple[int, int], targets, rank: int, repeats: int, device: str) -> list[list[object]]:
    from impasto.backends.torch_backend import TorchUNet
    from impasto.core.adapter_weights import EngineAdapters
    from impasto.lora import DeltaCache, load_adapter
    from safetensors.torch import load_file

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tmp = Path(tempfile.mkdtemp(prefix="lora_switch_"))
    files = {n: make_lora_file(unet, tmp / n, targets, rank, seed) for n, seed in (("a", 1), ("b", 2))}
    adapters = {n: load_adapter(p) for n, p in files.items()}
    num_targets = len(adapters["a"].modules)
    merged_mb = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if n.removesuffix(".weight") in {t.removeprefix("unet.") for t in adapters["a"].modules}) / 2**20

    # --- ours --- (the engine wraps `unet` itself; restore() hands it back bit-exact for diffusers)
    engine = TorchUNet(unet, device=device)
    ours = {}
    for name, cache_bytes in (("cached", 1 << 40), ("uncached", 0), ("kept", 1 << 40)):
        state = EngineAdapters(engine, "unet", DeltaCache(cache_bytes), "bench")
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
    with torch.inference_mode():
        step_unfused = timed(
            lambda: d_unet(inputs["sample"].to(device), inputs["timestep"].to(device), encoder_hidden_states=inputs["encoder_hidden_states"].to(device), return_dict=False),
            max(2, repeats // 3),
            sync,
        )
    d_unet.unload_lora()

    def ms(s):
        return f"{s * 1000:.1f}"

    shape = f"{label} ({num_targets} targets, rank {rank}, {merged_mb:.0f} MB of weights)"
    return [
        [shape, "ours: refit, merged weights cached", ms(ours["cached"]), f"{load_fuse_s / ours['cached']:.0f}x", ms(step_fused)],
        [shape, "ours: refit, composed in the engine (first use)", ms(ours["uncached"]), f"{load_fuse_s / ours['uncached']:.0f}x", ms(step_fused)],
        [shape, "ours: refit, composed and kept (second use)", ms(ours["kept"]), f"{load_fuse_s / ours['kept']:.0f}x", ms(step_fused)],
        [shape, "diffusers: unfuse+unload, load_lora_adapter+fuse_lora", ms(load_fuse_s), "1x", ms(step_fused)],
        [shape, "diffusers: set_adapters (both loaded, unfused)", ms(set_adapters_s), f"{load_fuse_s / set_adapters_s:.0f}x", ms(step_unfused)],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-sd15", action="store_true", help="only the default model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default=str(torch.get_num_threads()), help="comma-separated torch thread counts, e.g. 1,2")
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from impasto.models import default_model_path

    # Loading the second adapter beside the first makes diffusers list the first's keys as
    # "missing" (they are in the model, not in that file): noise for this benchmark.
    diffusers_logging.set_verbosity_error()
    threads = [int(t) for t in args.threads.split(",")]
    print_header("LoRA switch: refit vs diffusers (UNet only)")
    rows = []
    tiny_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
    for n in threads:
        torch.set_num_threads(n)
        tiny = UNet2DConditionModel.from_pretrained(Path(default_model_path()) / "unet").eval()
        size = tiny.config.sample_size
        rows += bench_model(f"default model, {n} thr", tiny, (size, size), tiny_targets, 4, args.repeats, args.device)
    if not args.no_sd15:
        torch.set_num_threads(max(threads))
        torch.manual_seed(0)
        sd15 = UNet2DConditionModel().eval()  # the defaults are SD 1.5's UNet
        hw = (64, 64) if args.device.startswith("cuda") else (32, 32)
        rows += bench_model(
            f"SD 1.5 UNet, latent {hw[0]}x{hw[1]}, {max(threads)} thr", sd15, hw, ["to_q", "to_k", "to_v", "to_out.0"], 16, max(3, args.repeats // 3), args.device
        )
    print_table(["model", "switch", "switch ms (median)", "vs load+fuse", "UNet step ms (CFG batch 2)"], rows)
    print("step column: fused rows = plain weights (what refit leaves); set_adapters row = peft layers active, unfused.")


if __name__ == "__main__":
    main()
