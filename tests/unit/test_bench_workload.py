"""The bench harness's request mix and arrival schedule: parsing, reproducibility, Poisson statistics."""

from __future__ import annotations

import json
import statistics

import pytest

from impasto_client.bench.cli import add_arguments, workload_from_args
from impasto_client.bench.load import poisson_arrivals
from impasto_client.bench.workload import RequestClass, Workload, load_workload, parse_class_spec, plan_requests

MIX_TOML = """
[[classes]]
name = "fast"
weight = 3
steps = 4
size = "64x64"
sampler = "euler"

[[classes]]
name = "large"
steps = 20
size = "128x96"
num_images = 2
guidance_scale = 5.5
prompt = "a green triangle, on black"
"""


def test_toml_and_json_files_give_the_same_workload(tmp_path):
    toml_path = tmp_path / "mix.toml"
    toml_path.write_text(MIX_TOML)
    import tomllib

    json_path = tmp_path / "mix.json"
    json_path.write_text(json.dumps(tomllib.loads(MIX_TOML)))
    from_toml, from_json = load_workload(toml_path), load_workload(json_path)
    assert from_toml == from_json
    fast, large = from_toml.classes
    assert (fast.name, fast.weight, fast.num_steps, fast.width, fast.height, fast.sampler) == ("fast", 3.0, 4, 64, 64, "euler")
    assert (large.width, large.height, large.num_images, large.guidance_scale) == (128, 96, 2, 5.5)
    assert large.prompt == "a green triangle, on black"
    assert large.weight == 1.0 and large.sampler == ""  # unset: the server's default


def test_unset_fields_stay_unset_in_the_request_options():
    options = RequestClass("plain").generate_options()
    assert options["num_steps"] is None and options["guidance_scale"] is None
    assert options["width"] == options["height"] == 0 and options["sampler"] == ""


def test_class_flag_parses_like_a_file_entry():
    cls = parse_class_spec("slow:steps=30,size=64x64,sampler=dpmpp_2m,weight=0.5")
    assert cls == RequestClass("slow", weight=0.5, num_steps=30, width=64, height=64, sampler="dpmpp_2m")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("x:stepz=4", "unknown keys ['stepz']"),
        ("x:steps", "expected key=value"),
        ("x:size=64", "size must look like 64x64"),
        ("x:steps=0", "steps must be >= 1"),
        ("x:weight=-1", "weight must be > 0"),
        (":steps=4", "needs a name"),
    ],
)
def test_bad_class_flags_are_refused_with_the_reason(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_class_spec(spec)


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "extra.json").write_text(json.dumps({"classes": [{"name": "a"}], "rate": 3}))
    with pytest.raises(ValueError, match="exactly one top-level key"):
        load_workload(tmp_path / "extra.json")
    (tmp_path / "dup.json").write_text(json.dumps({"classes": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(ValueError, match="unique"):
        load_workload(tmp_path / "dup.json")
    (tmp_path / "mix.yaml").write_text("classes: []")
    with pytest.raises(ValueError, match=".json or .toml"):
        load_workload(tmp_path / "mix.yaml")


def test_plan_is_reproducible_weighted_and_seeds_follow_the_index():
    workload = Workload((RequestClass("a", weight=3), RequestClass("b", weight=1)))
    plan = plan_requests(workload, 4000, seed=7)
    assert plan == plan_requests(workload, 4000, seed=7)
    assert plan != plan_requests(workload, 4000, seed=8)
    assert [p.seed for p in plan[:3]] == [7, 8, 9] and [p.index for p in plan[:3]] == [0, 1, 2]
    share_a = sum(p.request_class.name == "a" for p in plan) / len(plan)
    assert 0.72 < share_a < 0.78  # weight 3 of 4; binomial sd ~0.007
    # A later window of the same run draws the same classes as the whole plan did there.
    assert plan_requests(workload, 10, seed=7, first_index=100) == plan[100:110]


def test_poisson_arrivals_have_mean_gap_one_over_rate_and_are_seeded():
    rate = 4.0
    arrivals = poisson_arrivals(rate, 20_000, seed=3)
    assert arrivals == poisson_arrivals(rate, 20_000, seed=3)
    assert arrivals != poisson_arrivals(rate, 20_000, seed=4)
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals)]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)  # sd of the mean ~0.7%
    # Exponential gaps: the standard deviation equals the mean (a fixed rate would give 0).
    assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.05)


def test_poisson_arrivals_are_bounded_by_count_and_by_duration():
    assert len(poisson_arrivals(10.0, 5, seed=0)) == 5
    bounded = poisson_arrivals(10.0, 10_000, duration=2.0, seed=0)
    assert bounded and bounded[-1] <= 2.0 and 10 < len(bounded) < 40
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(0.0, 5)


def test_command_line_takes_the_mix_one_way_only(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    single = workload_from_args(parser.parse_args(["--steps", "6", "--size", "64x32", "--sampler", "ddim"]))
    assert single.classes == (RequestClass("default", num_steps=6, width=64, height=32, sampler="ddim"),)
    two = workload_from_args(parser.parse_args(["--class", "a:steps=2", "--class", "b:steps=3"]))
    assert [c.name for c in two.classes] == ["a", "b"]
    with pytest.raises(ValueError, match="one way"):
        workload_from_args(parser.parse_args(["--class", "a:steps=2", "--steps", "4"]))
