"""`<lora:name:weight>` prompt tags and per-step weight schedules."""

from __future__ import annotations

import pytest

from impasto.core.adapter_syntax import extract_lora_tags, parse_schedule
from impasto.core.errors import InvalidArgument


def test_tags_are_stripped_in_prompt_order_with_default_weight():
    text, tags = extract_lora_tags("a <lora:ink:0.6> cat, <lora:paper> on a mat")
    assert text == "a  cat,  on a mat"
    assert [(t.name, t.weight, t.schedule) for t in tags] == [("ink", 0.6, None), ("paper", 1.0, None)]


def test_tag_with_schedule_and_untouched_other_networks():
    text, tags = extract_lora_tags("<hypernet:x:1> dog <lora:ink:0@0,1@0.5>")
    assert text == "<hypernet:x:1> dog "
    assert tags[0].schedule.points == ((0.0, 0.0), (0.5, 1.0))


@pytest.mark.parametrize("prompt, problem", [
    ("<lora::1>", "no adapter name"),
    ("<lora:ink:0.5:0.7>", "separate text-encoder/UNet"),
    ("<lora:ink:te=1>", "separate text-encoder/UNet"),
    ("<lora:ink:abc>", "not a number"),
    ("<lora:ink:nan>", "finite"),
])
def test_bad_tags_name_the_problem(prompt, problem):
    with pytest.raises(InvalidArgument, match=problem) as info:
        extract_lora_tags(prompt)
    assert info.value.field == "prompt"


def test_schedule_is_linear_between_points_and_held_outside():
    s = parse_schedule("1@0.8, 0@0.2")  # any order
    assert s.at(0.0) == 0 and s.at(0.2) == 0 and s.at(0.5) == pytest.approx(0.5) and s.at(0.8) == 1 and s.at(1.0) == 1
    assert parse_schedule("0.7@0").at(0.9) == pytest.approx(0.7)


@pytest.mark.parametrize("text, problem", [("1", "weight@fraction"), ("1@1.5", "0..1"), ("x@0", "not a number"), ("1@0,", "weight@fraction")])
def test_bad_schedules_are_refused(text, problem):
    with pytest.raises(InvalidArgument, match=problem):
        parse_schedule(text, "adapters[0].weight_schedule")
