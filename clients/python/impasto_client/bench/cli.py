"""The command line: `python -m impasto_client.bench ...` and `impasto bench ...` (the server's
CLI registers it with `add_bench_command`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..aio import AsyncImpastoClient
from ..errors import ImpastoError
from .load import poisson_arrivals, run_closed_loop, run_open_loop, warm_up
from .report import format_table, summarize
from .workload import RequestClass, Workload, load_workload, parse_class_spec, parse_size, plan_requests

DESCRIPTION = "Measure a running impasto server: latency percentiles, time to first progress event and images/s per request class."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:50051", help="server address (default localhost:50051)")
    mix = parser.add_argument_group("request mix (one of: --workload, --class ..., or the single-class flags)")
    mix.add_argument("--workload", type=Path, help="a .json or .toml file listing request classes")
    mix.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME:key=value,...", help="a request class inline; repeatable")
    mix.add_argument("--steps", type=int, help="single class: steps (default: the model's)")
    mix.add_argument("--size", help="single class: WIDTHxHEIGHT (default: the model's)")
    mix.add_argument("--sampler", default="", help="single class: sampler name")
    mix.add_argument("--num-images", type=int, default=1, help="single class: images per request")
    mix.add_argument("--guidance-scale", type=float, help="single class: guidance scale")
    mix.add_argument("--prompt", help="single class: the prompt")
    load = parser.add_argument_group("load (--rate for an open loop; otherwise a closed-loop --concurrency sweep)")
    load.add_argument("--rate", type=float, help="open loop: requests/s with Poisson arrivals")
    load.add_argument("--max-in-flight", type=int, default=16, help="open loop: at most this many requests at once (the clients)")
    load.add_argument("--concurrency", default="1,4,16", help="closed loop: comma-separated client counts to sweep (default 1,4,16)")
    load.add_argument("--requests", type=int, default=32, help="requests per run (per concurrency level), default 32")
    load.add_argument("--duration", type=float, help="stop sending new requests after this many seconds per run")
    load.add_argument("--warmup", type=int, default=1, help="warm-up requests per class, not measured (default 1)")
    load.add_argument("--timeout", type=float, help="per-request deadline in seconds")
    load.add_argument("--seed", type=int, default=0, help="seeds the class draw, the arrivals and the image seeds")
    parser.add_argument("--json", help="write the JSON report here ('-' for stdout; the tables then go to stderr)")


def add_bench_command(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on an argparse subparsers object (the server's `impasto` CLI calls this)."""
    parser = subparsers.add_parser("bench", help="load-test a running server (latency, TTFP, images/s)", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run_bench)
    return parser


def workload_from_args(args: argparse.Namespace) -> Workload:
    single = any(v is not None for v in (args.steps, args.size, args.guidance_scale, args.prompt)) or args.sampler or args.num_images != 1
    sources = sum([args.workload is not None, bool(args.classes), bool(single)])
    if sources > 1:
        raise ValueError("give the mix one way: --workload FILE, --class ..., or the single-class flags (--steps, --size, ...)")
    if args.workload is not None:
        return load_workload(args.workload)
    if args.classes:
        return Workload(tuple(parse_class_spec(text) for text in args.classes))
    width, height = parse_size(args.size) if args.size else (0, 0)
    options = {"prompt": args.prompt} if args.prompt is not None else {}
    return Workload(
        (
            RequestClass(
                "default",
                num_steps=args.steps,
                width=width,
                height=height,
                sampler=args.sampler,
                num_images=args.num_images,
                guidance_scale=args.guidance_scale,
                **options,
            ),
        )
    )


def concurrency_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency levels must be >= 1, got {text!r}")
    return levels


async def bench(args: argparse.Namespace, workload: Workload, log=print) -> dict:
    """Warm up, run the load, and return the JSON report: {"target", "classes", "runs": [...]}."""
    names = [c.name for c in workload.classes]
    async with AsyncImpastoClient(args.target) as client:
        info = await client.server_info()  # fails fast, with the reason, when nothing listens there
        failed = await warm_up(client, workload, args.warmup, args.timeout)
        if failed:
            log(f"warning: {failed} warm-up request(s) failed")
        plan = plan_requests(workload, args.requests, seed=args.seed)
        runs = []
        if args.rate is not None:
            arrivals = poisson_arrivals(args.rate, args.requests, args.duration, seed=args.seed)
            result = await run_open_loop(client, plan, arrivals, max_in_flight=args.max_in_flight, timeout=args.timeout, rate=args.rate)
            runs.append(summarize(result, names))
            log(format_table(runs[-1]) + "\n")
        else:
            for level in concurrency_levels(args.concurrency):
                result = await run_closed_loop(client, plan, level, duration=args.duration, timeout=args.timeout)
                runs.append(summarize(result, names))
                log(format_table(runs[-1]) + "\n")
    return {
        "target": args.target,
        "server_version": info.version,
        "classes": [asdict(c) for c in workload.classes],
        "seed": args.seed,
        "warmup_per_class": args.warmup,
        "runs": runs,
    }


def run_bench(args: argparse.Namespace) -> int:
    try:
        workload = workload_from_args(args)
        if args.rate is None:
            concurrency_levels(args.concurrency)  # refuse a bad flag before any load is sent
        if args.requests < 1:
            raise ValueError(f"--requests must be >= 1, got {args.requests}")
    except ValueError as error:
        print(f"impasto bench: {error}", file=sys.stderr)
        return 2
    to_stdout = args.json == "-"
    log = (lambda text: print(text, file=sys.stderr)) if to_stdout else print
    log(f"target {args.target}; classes: {', '.join(c.name for c in workload.classes)}")
    try:
        report = asyncio.run(bench(args, workload, log))
    except ImpastoError as error:
        print(f"impasto bench: {error}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if to_stdout:
        print(text)
    elif args.json:
        Path(args.json).write_text(text + "\n")
        log(f"wrote {args.json}")
    return 0 if report["runs"] and all(run["all"]["num_ok"] for run in report["runs"]) else 1
