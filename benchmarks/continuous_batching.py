"""Step-level continuous batching under mixed load: impasto batched, impasto unbatched, diffusers.

One run, default embedded model. Three systems serve the same requests (same classes, seeds and
Poisson arrival schedule):
  (a) `impasto serve --max-batch-size 8`: the step-level scheduler;
  (b) `impasto serve --max-batch-size 1`: batching off, one request at a time, FCFS;
  (c) diffusers' StableDiffusionPipeline in this process, one request at a time: a worker thread
      takes requests in arrival order from a queue fed on the same schedule, swapping in the
      sampler's noise scheduler per request (what a user would write instead of a server).

Phases (a, b and c alternate within each, so load from other jobs on the machine hits all three):
  1. alone: each class a few times, one request at a time on an idle system;
  2. saturation: 16 closed-loop clients back to back; images/s is each system's capacity.
     (At a rate below every system's capacity, all three deliver the offered rate, so the
     images/s goal can only be judged here.) (b)'s requests/s here is its measured capacity;
  3. open loop: Poisson arrivals at --load x (b)'s capacity, at most 16 requests in flight;
     latency per class, and p99 under load / alone for the 4-step class.
Both loads draw the same requests (same classes and seeds, in the same order), so their mixes match.

Threads: every system gets --threads intra-op threads (default 1). torch's default (one per
core, OpenMP spin-waits) collapses by 10-100x when the cores are shared with other jobs, which
would measure the neighbours rather than the scheduler.

    .venv/bin/python benchmarks/continuous_batching.py [--requests 64] [--open-loop-seconds 40] [--load 0.75] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import queue
import re
from pathlib import Path
import statistics
import subprocess
import sys
import threading
import time

from bench_common import ROOT, print_header, print_table

from impasto_client import AsyncImpastoClient
from impasto_client.bench import (
    LoadResult,
    PlannedRequest,
    RequestClass,
    RequestRecord,
    Workload,
    plan_requests,
    poisson_arrivals,
    run_closed_loop,
    run_open_loop,
    summarize,
    warm_up,
)

GUIDANCE = 7.5  # the default model's recommended guidance; set explicitly so (c) uses the same
WORKLOAD = Workload(
    (
        RequestClass("fast", weight=0.5, num_steps=4, width=64, height=64, sampler="euler", guidance_scale=GUIDANCE, prompt="a red circle on a white background"),
        RequestClass("slow", weight=0.3, num_steps=30, width=64, height=64, sampler="dpmpp_2m", guidance_scale=GUIDANCE, prompt="a blue square on a yellow background"),
        RequestClass("large", weight=0.2, num_steps=20, width=128, height=128, sampler="euler_a", guidance_scale=GUIDANCE, prompt="a green triangle on a black background"),
    )
)
FAST_CLASS = "fast"
SYSTEMS = ("a", "b", "c")
SYSTEM_NAMES = {"a": "(a) impasto, batch 8", "b": "(b) impasto, batch 1", "c": "(c) diffusers, 1 at a time"}


# --- the impasto servers ----------------------------------------------------------------------
def compile_openvino(engines_dir: Path, precision: str = "fp32") -> None:
    """OpenVINO engines of the default model for the workload's two sizes, batches up to 16
    UNet rows (8 images with CFG). Reused when already built."""
    from impasto.backends.manifest import Profile
    from impasto.compiler.build import BuildRequest, compile_model
    from impasto.models import default_model_path

    profiles = (Profile(64, 64, 1, 16), Profile(128, 128, 1, 16))
    request = BuildRequest(default_model_path(), "openvino", engines_dir, precision=precision, profiles=profiles)
    result = compile_model(request, log=lambda *a: None)
    progress(f"openvino engines: {result.folder} ({'reused' if result.reused else f'built in {result.seconds:.0f} s'})")


def start_server(max_batch_size: int, threads: int, engines_dir: Path | None = None, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    backend = ["--backend", "openvino,torch", "--engines-dir", str(engines_dir)] if engines_dir else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "impasto.cli", "--log-level", "WARNING", "serve", "--port", "0", "--max-batch-size", str(max_batch_size), "--threads", str(threads), *backend, *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        match = re.match(r"impasto: serving on (\S+)", line)
        if match:
            # Keep draining its output, or a chatty server would block on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, match.group(1)
    raise RuntimeError(f"server (max batch size {max_batch_size}) did not start; exit code {proc.wait()}")


async def _server_warm_up(target: str) -> None:
    async with AsyncImpastoClient(target) as client:
        failed = await warm_up(client, WORKLOAD, per_class=2)
    if failed:
        raise RuntimeError(f"{failed} warm-up requests failed on {target}")


async def _server_alone(target: str, plan: list[PlannedRequest]) -> LoadResult:
    async with AsyncImpastoClient(target) as client:
        return await run_closed_loop(client, plan, concurrency=1)


async def _server_open_loop(target: str, plan, arrivals, rate: float, max_in_flight: int) -> LoadResult:
    async with AsyncImpastoClient(target) as client:
        return await run_open_loop(client, plan, arrivals, max_in_flight=max_in_flight, rate=rate)


async def _server_saturation(target: str, plan, clients: int) -> LoadResult:
    async with AsyncImpastoClient(target) as client:
        return await run_closed_loop(client, plan, concurrency=clients)


# --- (c): diffusers, one request at a time ---------------------------------------------------
class DiffusersWorker:
    """StableDiffusionPipeline serving one request at a time, as a user would write it."""

    def __init__(self):
        from diffusers import StableDiffusionPipeline

        from impasto.models import default_model_path

        self.pipe = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_scheduler_config = dict(self.pipe.scheduler.config)

    def serve(self, planned: PlannedRequest, record: RequestRecord, clock) -> RequestRecord:
        import torch

        from impasto.core.samplers import SAMPLERS, make_noise_scheduler

        cls = planned.request_class
        record.sent = clock()
        self.pipe.scheduler = make_noise_scheduler(SAMPLERS[cls.sampler], self.base_scheduler_config, planned.seed)

        def on_step_end(pipe, step, timestep, kwargs):
            if record.first_progress is None:
                record.first_progress = clock()
            return kwargs

        images = self.pipe(
            cls.prompt,
            negative_prompt=cls.negative_prompt or None,
            num_inference_steps=cls.num_steps,
            guidance_scale=cls.guidance_scale,
            width=cls.width,
            height=cls.height,
            num_images_per_prompt=cls.num_images,
            generator=torch.Generator("cpu").manual_seed(planned.seed),
            callback_on_step_end=on_step_end,
        ).images
        for image in images:  # the server sends PNG bytes; so does a user's handler
            image.save(io.BytesIO(), format="PNG")
        record.num_images = len(images)
        record.finished = clock()
        return record


def _record(planned: PlannedRequest, arrival: float) -> RequestRecord:
    return RequestRecord(planned.index, planned.request_class.name, planned.seed, arrival)


def diffusers_sequential(worker: DiffusersWorker, plan: list[PlannedRequest]) -> LoadResult:
    """Back to back, one client: each request's latency is its service time (the alone runs)."""
    return diffusers_closed_loop(worker, plan, clients=1)


def diffusers_closed_loop(worker: DiffusersWorker, plan: list[PlannedRequest], clients: int) -> LoadResult:
    """`clients` closed-loop clients in front of the one worker: the first `clients` requests
    arrive at 0, and each later one when its client's previous request ends (request i - clients,
    since a single worker ends them in order). Served in arrival order, as a queue would."""
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    records: list[RequestRecord] = []
    for i, planned in enumerate(plan):
        arrival = 0.0 if i < clients else records[i - clients].finished
        records.append(worker.serve(planned, _record(planned, arrival), clock))
    return LoadResult("closed_loop", records, clock(), concurrency=clients)


def diffusers_open_loop(worker: DiffusersWorker, plan, arrivals, rate: float) -> LoadResult:
    """A feeder puts each request on the queue at its arrival time; one worker thread serves them in order."""
    inbox: queue.Queue = queue.Queue()
    records: list[RequestRecord] = []
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731

    def work() -> None:
        while (item := inbox.get()) is not None:
            planned, arrival = item
            records.append(worker.serve(planned, _record(planned, arrival), clock))

    thread = threading.Thread(target=work, name="diffusers-worker")
    thread.start()
    for planned, arrival in zip(plan, arrivals):
        time.sleep(max(0.0, arrival - clock()))
        inbox.put((planned, arrival))
    inbox.put(None)
    thread.join()
    return LoadResult("open_loop", records, max([arrivals[-1]] + [r.finished for r in records]), rate=rate, concurrency=1)


# --- the run ----------------------------------------------------------------------------------
def alone_plan(runs: int) -> list[PlannedRequest]:
    return [PlannedRequest(5000 + k * len(WORKLOAD.classes) + i, cls, 5000 + k) for k in range(runs) for i, cls in enumerate(WORKLOAD.classes)]


def medians_by_class(result: LoadResult) -> dict[str, float]:
    return {c.name: statistics.median(r.latency for r in result.records if r.class_name == c.name and r.ok) for c in WORKLOAD.classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="open-loop requests per system")
    parser.add_argument("--open-loop-seconds", type=float, default=40, help="no open-loop arrivals after this (bounds the run on a busy machine)")
    parser.add_argument("--saturation-requests", type=int, default=32, help="closed-loop requests per system")
    parser.add_argument("--load", type=float, default=0.75, help="offered rate as a fraction of (b)'s capacity")
    parser.add_argument("--clients", type=int, default=16, help="at most this many requests in flight")
    parser.add_argument("--alone-runs", type=int, default=3, help="runs per class for the alone latency")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per system (see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast-lane-max-steps", type=int, default=None, help="passed to (a)'s serve (0: the fast lane off); default: the server's")
    parser.add_argument("--json", help="also write every summary here")
    parser.add_argument("--openvino", action="store_true", help="(a) and (b) run on OpenVINO engines compiled for the workload's sizes")
    parser.add_argument("--engines-dir", type=Path, default=Path("/tmp/impasto-bench-engines"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="OpenVINO engine precision with --openvino")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    engines_dir = None
    if args.openvino:
        engines_dir = args.engines_dir / args.precision  # one precision per folder: the server loads all it finds
        compile_openvino(engines_dir, args.precision)
        SYSTEM_NAMES.update(a=f"(a) impasto+OpenVINO {args.precision}, batch 8", b=f"(b) impasto+OpenVINO {args.precision}, batch 1")
    lane = () if args.fast_lane_max_steps is None else ("--fast-lane-max-steps", str(args.fast_lane_max_steps))
    servers = {"a": start_server(8, args.threads, engines_dir, lane), "b": start_server(1, args.threads, engines_dir)}
    targets = {name: target for name, (_, target) in servers.items()}
    try:
        worker = DiffusersWorker()
        for name in ("a", "b"):
            asyncio.run(_server_warm_up(targets[name]))
        diffusers_sequential(worker, alone_plan(1))  # warm-up, not measured

        # 1. alone
        progress("alone")
        alone_runs = {}
        for name in SYSTEMS:
            plan = alone_plan(args.alone_runs)
            alone_runs[name] = diffusers_sequential(worker, plan) if name == "c" else asyncio.run(_server_alone(targets[name], plan))
        alone = {name: medians_by_class(result) for name, result in alone_runs.items()}

        # 2. saturation: each system's capacity; (b)'s sets the open loop's rate
        progress("saturation")
        plan = plan_requests(WORKLOAD, max(args.requests, args.saturation_requests), seed=args.seed)
        saturation = {}
        for name in SYSTEMS:
            if name == "c":
                saturation[name] = diffusers_closed_loop(worker, plan[: args.saturation_requests], args.clients)
            else:
                saturation[name] = asyncio.run(_server_saturation(targets[name], plan[: args.saturation_requests], args.clients))
        sat_b = saturation["b"]
        capacity_b = sum(r.ok for r in sat_b.records) / sat_b.duration
        rate = args.load * capacity_b

        # 3. open loop, the same plan and arrivals for all three
        progress(f"open loop at {rate:.2f} requests/s")
        arrivals = poisson_arrivals(rate, args.requests, duration=args.open_loop_seconds, seed=args.seed)
        plan = plan[: len(arrivals)]
        open_loop = {}
        for name in SYSTEMS:
            if name == "c":
                open_loop[name] = diffusers_open_loop(worker, plan, arrivals, rate)
            else:
                open_loop[name] = asyncio.run(_server_open_loop(targets[name], plan, arrivals, rate, args.clients))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    elapsed = time.perf_counter() - began

    names = [c.name for c in WORKLOAD.classes]
    open_summary = {n: summarize(r, names) for n, r in open_loop.items()}
    sat_summary = {n: summarize(r, names) for n, r in saturation.items()}
    alone_summary = {n: summarize(r, names) for n, r in alone_runs.items()}

    print_header(
        f"Continuous batching, default model, {len(plan)} open-loop requests per system, "
        f"{args.clients} clients, {args.threads} intra-op thread(s) per system"
    )
    print("mix: " + "; ".join(f"{c.name} ({c.weight:g}): {c.num_steps} steps {c.width}x{c.height} {c.sampler}, cfg {c.guidance_scale:g}" for c in WORKLOAD.classes))
    print(f"load: machine load average {os.getloadavg()[0]:.1f} at the end (other jobs share these cores; phases alternate a, b, c)")
    print()
    print("## alone: median latency, one request at a time on an idle system")
    print_table(["class", *(f"{SYSTEM_NAMES[n]} ms" for n in SYSTEMS)], [[c, *(f"{alone[n][c] * 1e3:.0f}" for n in SYSTEMS)] for c in names])

    print(f"## saturation: {args.clients} closed-loop clients, {args.saturation_requests} requests per system")
    print_table(
        ["system", "images/s", "p50 ms", "p99 ms", "errors", "seconds"],
        [
            [SYSTEM_NAMES[n], f"{s['all']['images_per_s']:.2f}", _ms(s["all"]["latency_s"]["p50"]), _ms(s["all"]["latency_s"]["p99"]), s["all"]["num_errors"], f"{s['duration_s']:.1f}"]
            for n, s in sat_summary.items()
        ],
    )

    print(f"(b)'s measured capacity: {capacity_b:.2f} requests/s; open-loop rate: {rate:.2f} requests/s ({args.load:.0%} of it)")
    print()

    print(f"## open loop: Poisson arrivals at {rate:.2f} requests/s, at most {args.clients} in flight")
    rows = []
    for n in SYSTEMS:
        s = open_summary[n]
        for c in [*names, "all"]:
            g = s["all"] if c == "all" else s["classes"][c]
            lat, ttfp = g["latency_s"], g["time_to_first_progress_s"]
            rows.append([SYSTEM_NAMES[n], c, g["num_requests"], g["num_errors"], _ms(lat["p50"]), _ms(lat["p99"]), _ms(ttfp["p50"]), _ms(ttfp["p99"]), f"{g['images_per_s']:.2f}"])
    print_table(["system", "class", "requests", "errors", "p50 ms", "p99 ms", "TTFP p50 ms", "TTFP p99 ms", "images/s"], rows)

    fast_p99 = open_summary["a"]["classes"][FAST_CLASS]["latency_s"]["p99"]
    fast_ratio = fast_p99 / alone["a"][FAST_CLASS]
    fast_ratio_b = open_summary["b"]["classes"][FAST_CLASS]["latency_s"]["p99"] / alone["b"][FAST_CLASS]
    sat_ratio = sat_summary["a"]["all"]["images_per_s"] / sat_summary["c"]["all"]["images_per_s"]
    open_ratio = open_summary["a"]["all"]["images_per_s"] / open_summary["c"]["all"]["images_per_s"]
    print("## goals")
    print(f"4-step p99 under load / alone, (a): {fast_ratio:.2f}x (goal <= 2x: {'met' if fast_ratio <= 2 else 'NOT met'}); (b) for comparison: {fast_ratio_b:.2f}x")
    print(f"images/s (a) / (c) at saturation: {sat_ratio:.2f}x (goal >= 3x: {'met' if sat_ratio >= 3 else 'NOT met'})")
    print(f"images/s (a) / (c) at the open-loop rate: {open_ratio:.2f}x (a system below capacity delivers the offered rate, so ~1x unless (c) fell behind)")
    print(f"total run time: {elapsed:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rate_per_s": rate, "capacity_b_per_s": capacity_b, "alone": alone_summary, "open_loop": open_summary, "saturation": sat_summary}, f, indent=2)


def progress(phase: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {phase} ...", file=sys.stderr, flush=True)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


if __name__ == "__main__":
    main()
