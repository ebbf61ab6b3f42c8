"""Quality of the embedded default model, as the judge sees it. Prints tables; asserts nothing.

    python benchmarks/default_model_quality.py [--model models/default] [--seeds 8]

1. Judge accuracy on a fresh generated test set (every shape and colour, held-out included).
2. Prompt fidelity: every seen (shape, colour) pair, `--seeds` seeds each, default settings;
   the per-pair hit-rate table (bar: >= 80%).
3. Negative prompt: "a circle" with negative prompt "red"; the share of seeds with no red
   circle (bar: >= 80%), beside the same seeds without the negative prompt.
4. The VAE's round trip on seen and held-out images (the DreamBooth issue needs the latter).
5. Time per default image (batch 1, default steps and guidance) on this machine.

Images come from diffusers' StableDiffusionPipeline, whose output the server reproduces.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline

from impasto.models import DEFAULT_MODEL_NAME, DEFAULT_SETTINGS, default_model_path
from impasto.models.judge import classify, judge
from impasto.models.shapes import COLOURS, SEEN_COLOURS, SEEN_SHAPES, SHAPES, caption
from impasto.training.shapes_dataset import render_scenes, sample_scenes, scene_labels, to_model_pixels

# The three A1111 names the default settings may use, as diffusers noise schedulers.
SAMPLERS = {
    "euler_a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg),
    "dpmpp_2m": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
}


def load_pipeline(path: str, sampler: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.scheduler = SAMPLERS[sampler](pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, seeds: list[int], negative_prompt: str | None = None) -> list[np.ndarray]:
    s = DEFAULT_SETTINGS
    out = pipe(
        [prompt] * len(seeds),
        negative_prompt=None if negative_prompt is None else [negative_prompt] * len(seeds),
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        width=s.width,
        height=s.height,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="np",
    ).images
    return [(im * 255).round().astype(np.uint8) for im in out]


def header(model: str) -> None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    print(f"# {DEFAULT_MODEL_NAME} quality  model={model}  commit={commit}")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"# settings: {DEFAULT_SETTINGS}\n")


def judge_accuracy(num: int = 2000, seed: int = 123_456) -> None:
    scenes = sample_scenes(num, seed, SHAPES, tuple(COLOURS))
    preds = classify(render_scenes(scenes))
    shapes, colours = scene_labels(scenes)
    s_ok = [p[0] == SHAPES[i] for p, i in zip(preds, shapes.tolist())]
    c_ok = [p[1] == tuple(COLOURS)[i] for p, i in zip(preds, colours.tolist())]
    both = sum(a and b for a, b in zip(s_ok, c_ok)) / num
    print(f"## 1. Judge accuracy, {num} fresh generated images (seed {seed})")
    print(f"shape {sum(s_ok) / num:.2%}  colour {sum(c_ok) / num:.2%}  both {both:.2%}  (bar: >= 98%)\n")


def prompt_fidelity(pipe, num_seeds: int) -> None:
    seeds = list(range(num_seeds))
    images, prompts = [], []
    for shape in SEEN_SHAPES:
        for colour in SEEN_COLOURS:
            prompt = caption(shape, colour, None)
            images += generate(pipe, prompt, seeds)
            prompts += [prompt] * len(seeds)
    result = judge(images, prompts)
    pairs = result.per_class["pair"]
    print(f"## 2. Prompt fidelity: prompt 'a <colour> <shape>', seeds 0..{num_seeds - 1}, judged correct (bar: >= 80% per pair)")
    print(f"{'':10s}" + "".join(f"{c:>8s}" for c in SEEN_COLOURS) + f"{'shape':>8s}")
    for shape in SEEN_SHAPES:
        row = "".join(f"{pairs[f'{c} {shape}']:8.0%}" for c in SEEN_COLOURS)
        print(f"{shape:10s}{row}{result.per_class['shape'][shape]:8.0%}")
    print(f"{'colour':10s}" + "".join(f"{result.per_class['colour'][c]:8.0%}" for c in SEEN_COLOURS))
    below = [p for p, r in pairs.items() if r < 0.8]
    print(f"overall {result.hit_rate:.1%} of {len(images)} images; pairs >= 80%: {len(pairs) - len(below)}/{len(pairs)}"
          + (f"; below: {', '.join(f'{p} {pairs[p]:.0%}' for p in below)}" if below else ""))
    # Which way the misses go: the judge's reading of each missed image.
    misses = [(p, pr) for p, pr, h in zip(prompts, result.predictions, result.hits) if not h]
    if misses:
        print("misses (prompt -> judged):", "; ".join(f"{p} -> {pr[1]} {pr[0]}" for p, pr in misses[:20]),
              "..." if len(misses) > 20 else "")
    print()


def negative_prompt(pipe, num_seeds: int) -> None:
    seeds = list(range(num_seeds))
    print(f"## 3. Negative prompt: 'a circle', negative 'red', seeds 0..{num_seeds - 1} (bar: >= 80% with no red circle)")
    for neg in (None, "red"):
        preds = classify(generate(pipe, "a circle", seeds, negative_prompt=neg))
        red_circles = sum(p == ("circle", "red") for p in preds)
        circles = sum(p[0] == "circle" for p in preds)
        label = "without negative" if neg is None else "negative 'red'  "
        print(f"{label}: no red circle {1 - red_circles / num_seeds:6.1%}   circles {circles}/{num_seeds}   red {sum(p[1] == 'red' for p in preds)}/{num_seeds}")
    print()


def timing(pipe, repeats: int = 7) -> None:
    generate(pipe, "a red circle", [0])  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, "a red circle on a white background", [i])
        times.append(time.perf_counter() - t0)
    s = DEFAULT_SETTINGS
    print(f"## 5. Time per default image ({s.width}x{s.height}, {s.num_inference_steps} steps {s.sampler}, CFG {s.guidance_scale}, batch 1)")
    print(f"median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms over {repeats} runs\n")


@torch.no_grad()
def vae_round_trip(pipe, num: int = 200) -> None:
    """The VAE on seen images and on held-out ones (star or pink), which it never trained on."""
    print(f"## 4. VAE round trip, {num} images each (PSNR; judge on the reconstructions)")
    held_out_shapes = tuple(s for s in SHAPES if s not in SEEN_SHAPES)
    held_out_colours = tuple(c for c in COLOURS if c not in SEEN_COLOURS)
    sets = {
        "seen": sample_scenes(num, 11, SEEN_SHAPES, SEEN_COLOURS),
        "held-out shape": sample_scenes(num, 12, held_out_shapes, SEEN_COLOURS),
        "held-out colour": sample_scenes(num, 13, SEEN_SHAPES, held_out_colours),
    }
    for name, scenes in sets.items():
        images = render_scenes(scenes)
        x = to_model_pixels(images)
        recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = 10 * torch.log10(4.0 / ((recon - x) ** 2).mean(dim=(1, 2, 3))).mean().item()
        recon_u8 = ((recon + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        hit = judge(recon_u8, [s.caption() for s in scenes]).hit_rate
        print(f"{name:16s} PSNR {psnr:5.1f} dB   judged correct {hit:6.1%}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--negative_seeds", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header(args.model)
    pipe = load_pipeline(args.model, DEFAULT_SETTINGS.sampler)
    judge_accuracy()
    prompt_fidelity(pipe, args.seeds)
    negative_prompt(pipe, args.negative_seeds)
    vae_round_trip(pipe)
    timing(pipe)


if __name__ == "__main__":
    main()
