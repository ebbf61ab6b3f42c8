"""The bench harness against a real server: the JSON report's structure, not its timings."""

from __future__ import annotations

import json

from impasto_client.bench.__main__ import main as bench_main
from impasto_client.bench.cli import add_bench_command

# Two tiny classes: enough to check per-class accounting while staying a few seconds on a CPU.
CLASSES = ["--class", "quick:steps=1,size=64x64,sampler=euler", "--class", "pair:steps=2,size=64x64,sampler=ddim,num_images=2,weight=0.5"]


def check_distribution(dist, expect_values: bool) -> None:
    assert set(dist) == {"p50", "p90", "p99", "mean", "max"}
    if expect_values:
        assert 0 < dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]
    else:
        assert dist["p50"] is None


def check_run(run, num_requests: int) -> None:
    assert set(run["classes"]) == {"quick", "pair"}
    groups = run["classes"].values()
    assert sum(g["num_requests"] for g in groups) == run["all"]["num_requests"] == num_requests
    assert run["all"]["num_errors"] == 0 and run["all"]["errors"] == {}
    for name, g in run["classes"].items():
        assert g["num_ok"] == g["num_requests"]
        assert g["num_images"] == g["num_ok"] * (2 if name == "pair" else 1)
        check_distribution(g["latency_s"], expect_values=g["num_ok"] > 0)
        check_distribution(g["time_to_first_progress_s"], expect_values=g["num_ok"] > 0)
        if g["num_ok"]:
            assert g["time_to_first_progress_s"]["max"] <= g["latency_s"]["max"]
    assert run["all"]["num_images"] == sum(g["num_images"] for g in groups)
    assert run["all"]["images_per_s"] > 0 and run["duration_s"] > 0


def test_open_loop_report(server, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["--target", server.target, *CLASSES, "--rate", "20", "--requests", "5", "--max-in-flight", "4", "--seed", "3", "--json", str(out)]
    assert bench_main(args) == 0
    report = json.loads(out.read_text())
    assert report["target"] == server.target and report["seed"] == 3
    assert [c["name"] for c in report["classes"]] == ["quick", "pair"]
    (run,) = report["runs"]
    assert run["mode"] == "open_loop" and run["rate_per_s"] == 20 and run["concurrency"] == 4
    check_run(run, 5)
    table = capsys.readouterr().out
    assert "open loop, 20 requests/s" in table and "quick" in table and "p99 ms" in table


def test_concurrency_sweep_report_on_stdout(server, capsys):
    args = ["--target", server.target, *CLASSES, "--concurrency", "1,3", "--requests", "4", "--warmup", "0", "--json", "-"]
    assert bench_main(args) == 0
    report = json.loads(capsys.readouterr().out)  # tables went to stderr
    assert [run["concurrency"] for run in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["mode"] == "closed_loop"
        check_run(run, 4)


def test_unreachable_target_fails_with_the_reason(capsys):
    assert bench_main(["--target", "127.0.0.1:1", "--steps", "2", "--requests", "1"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_registers_as_a_subcommand_of_the_server_cli():
    import argparse

    parser = argparse.ArgumentParser(prog="impasto")
    add_bench_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--target", "h:1", "--rate", "2"])
    assert args.command == "bench" and args.rate == 2 and callable(args.func)
