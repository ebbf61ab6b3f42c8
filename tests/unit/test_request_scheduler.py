"""The request scheduler, with hand-made requests: no model, no tensors, no clock."""

from __future__ import annotations

import pytest

from impasto.core.scheduler import RequestScheduler, ScheduledRequest


def req(rid, key="k", images=1, steps=3, priority=0, arrival=0.0):
    return ScheduledRequest(rid, key, images, steps, priority=priority, arrival=arrival)


def run_to_end(s: RequestScheduler, limit=100):
    trace = []
    for t in range(1, limit):
        out = s.schedule(float(t))
        if not out.batch and not s.has_work():
            break
        trace.append(out.batch)
        s.update(out.batch, t + 0.5)
    return trace


def test_batch_size_one_runs_equal_requests_one_after_another():
    s = RequestScheduler(max_batch_size=1)
    for i, rid in enumerate("abc"):
        s.add(req(rid, steps=2, arrival=i))
    assert run_to_end(s) == [["a"], ["a"], ["b"], ["b"], ["c"], ["c"]]


def test_short_request_is_admitted_past_running_long_ones():
    s = RequestScheduler(max_batch_size=1)  # running room: 4 images
    s.add(req("long1", steps=30, arrival=0))
    s.add(req("long2", steps=30, arrival=0.1))
    s.schedule(1.0)
    s.add(req("short", steps=4, arrival=1.5))
    out = s.schedule(2.0)
    assert out.admitted == ["short"] and out.batch == ["short"]


def test_requests_at_different_steps_share_a_call():
    s = RequestScheduler(max_batch_size=4)
    s.add(req("a", steps=3, arrival=0))
    out = s.schedule(1.0)
    assert out.admitted == ["a"] and out.batch == ["a"]
    s.update(out.batch, 1.0)
    s.add(req("b", steps=2, arrival=1.5))  # joins at a step boundary
    out = s.schedule(2.0)
    assert out.admitted == ["b"] and sorted(out.batch) == ["a", "b"]
    s.update(out.batch, 2.0)
    out = s.schedule(3.0)
    assert sorted(out.batch) == ["a", "b"]
    assert sorted(s.update(out.batch, 3.0)) == ["a", "b"]  # both finish, at different step counts
    assert not s.has_work()


def test_shorter_remaining_work_goes_first_across_batch_keys():
    s = RequestScheduler(max_batch_size=4)
    s.add(req("long", key="64x64", steps=6, arrival=0))
    s.add(req("short", key="128x128", steps=2, arrival=0.5))
    assert run_to_end(s) == [["short"], ["short"]] + [["long"]] * 6


def test_measured_step_time_counts_in_remaining_work():
    s = RequestScheduler(max_batch_size=4)
    s.add(req("warm-small", key="64", steps=1, arrival=0))
    s.add(req("warm-large", key="128", steps=1, arrival=0))
    s.update(s.schedule(0.0).batch, 0.0, step_seconds=0.01)  # one of them ran: measure it
    s.update(s.schedule(0.0).batch, 0.0, step_seconds=0.08)
    assert s.step_seconds("64") == 0.01 or s.step_seconds("128") == 0.01
    cheap = "64" if s.step_seconds("64") == 0.01 else "128"
    dear = "128" if cheap == "64" else "64"
    # 3 steps of the dear size (0.24 s) are more work than 10 of the cheap one (0.1 s).
    s.add(req("dear", key=dear, steps=3, arrival=1.0))
    s.add(req("cheap", key=cheap, steps=10, arrival=1.0))
    assert s.schedule(1.0).batch == ["cheap"]


def test_a_long_request_is_slowed_but_never_starved_by_short_ones():
    # A 2-step request every 3 steps keeps the server 2/3 busy with short work; the long one
    # takes the rest and finishes, while every short one finishes in its 2 steps.
    s = RequestScheduler(max_batch_size=1, max_running_images=100)
    s.add(req("long", key="L", steps=20, arrival=0))
    finished_at: dict[str, int] = {}
    for t in range(1, 80):
        if t % 3 == 1:
            s.add(req(f"short{t}", key="S", steps=2, arrival=float(t)))
        out = s.schedule(float(t))
        for done in s.update(out.batch, t + 0.5, step_seconds=1.0):
            finished_at[done] = t
    assert "long" in finished_at
    shorts = {k: v for k, v in finished_at.items() if k.startswith("short")}
    # each short one takes at most twice its time alone (2 steps)
    assert shorts and all(v - int(k[5:]) + 1 <= 4 for k, v in shorts.items()), shorts


def test_running_set_and_batch_are_capped_in_images_and_a_big_request_runs_alone():
    s = RequestScheduler(max_batch_size=3, max_running_images=3)
    s.add(req("two", images=2, arrival=0))
    s.add(req("one", images=1, arrival=1))
    s.add(req("big", images=5, arrival=2))
    out = s.schedule(1.0)
    assert out.admitted == ["two", "one"] and out.batch == ["two", "one"]
    trace = run_to_end(s)
    assert ["big"] in trace and all(len(b) <= 2 for b in trace)


def test_priority_goes_first_and_fifo_within():
    s = RequestScheduler(max_batch_size=1)
    s.add(req("batch1", priority=1, arrival=0, steps=1))
    s.add(req("inter1", priority=0, arrival=1, steps=1))
    s.add(req("inter2", priority=0, arrival=2, steps=1))
    assert s.waiting_positions(now=3.0) == {"inter1": 0, "inter2": 1, "batch1": 2}
    assert [b[0] for b in run_to_end(s)] == ["inter1", "inter2", "batch1"]


def test_abort_removes_waiting_and_running_and_is_reported_once():
    s = RequestScheduler(max_batch_size=1)
    s.add(req("run", steps=5))
    s.add(req("wait", steps=5, arrival=1))
    s.schedule(1.0)
    assert s.abort("run") and s.abort("wait") and not s.abort("unknown")
    out = s.schedule(2.0)
    assert sorted(out.aborted) == ["run", "wait"] and out.batch == []
    assert s.schedule(3.0).aborted == []
    assert not s.has_work()


def test_update_after_abort_is_ignored():
    s = RequestScheduler(max_batch_size=2)
    s.add(req("a", steps=1))
    out = s.schedule(1.0)
    s.abort("a")
    assert s.update(out.batch, 1.0) == []


def test_rejects_bad_config_and_duplicates():
    with pytest.raises(ValueError, match="max_batch_size"):
        RequestScheduler(0)
    s = RequestScheduler(2)
    s.add(req("a"))
    with pytest.raises(ValueError, match="already"):
        s.add(req("a"))


def test_waiting_batch_work_ages_past_new_interactive_work():
    s = RequestScheduler(max_batch_size=1, priority_aging_s=10.0)
    s.add(req("batch", priority=1, arrival=0.0, steps=1))
    s.add(req("interactive", priority=0, arrival=14.0, steps=1))
    # At t=15 the batch request has waited 15 s: 1 - 1.5 < 0 - 0.1, so it goes first.
    assert s.waiting_positions(now=15.0) == {"batch": 0, "interactive": 1}
    assert s.schedule(15.0).batch == ["batch"]


def test_running_batch_work_is_not_starved_by_another_batch_key():
    s = RequestScheduler(max_batch_size=2, priority_aging_s=1.0)
    s.add(req("batch", key="128", priority=1, arrival=0.0, steps=100))
    s.add(req("inter", key="64", priority=0, arrival=0.0, steps=100))
    picked = []
    for t in range(1, 7):
        out = s.schedule(float(t))
        picked += out.batch
        s.update(out.batch, float(t))
    assert "batch" in picked and "inter" in picked


# --- fast lane ------------------------------------------------------------------------------
def measure(s: RequestScheduler, key, images, seconds, now=0.0):
    """Run one 1-step request of this size alone, as if the step took `seconds`."""
    rid = f"measure-{key}-{images}-{seconds}-{now}"
    s.add(req(rid, key=key, images=images, steps=1, arrival=now))
    out = s.schedule(now)
    assert out.batch == [rid]
    s.update(out.batch, now, step_seconds=seconds)


def short_and_long(s: RequestScheduler, num_short=2, num_long=6):
    for i in range(num_long):
        s.add(req(f"long{i}", steps=30, arrival=0.5))
    for i in range(num_short):
        s.add(req(f"short{i}", steps=4, arrival=1.0))


def test_fast_lane_lets_long_requests_join_only_within_the_stretch():
    # step time 0.8 + 0.2 * images: 2 short images take 1.2; a stretch of 1.6 allows 1.92,
    # so 3 long images join (1.8) and a fourth (2.0) does not.
    s = RequestScheduler(max_batch_size=8, fast_lane_max_stretch=1.6)
    measure(s, "k", 1, 1.0)
    measure(s, "k", 8, 2.4)
    assert s.estimated_step_seconds("k", 2) == pytest.approx(1.2)
    assert s.estimated_step_seconds("k", 8) == 2.4  # measured: the EMA itself
    short_and_long(s)
    batch = s.schedule(1.0).batch
    assert batch[:2] == ["short0", "short1"]
    assert len(batch) == 5 and all(r.startswith("long") for r in batch[2:])


def test_fast_lane_adds_no_long_request_while_the_cost_is_unknown():
    s = RequestScheduler(max_batch_size=8)
    short_and_long(s)
    assert s.schedule(1.0).batch == ["short0", "short1"]
    # one measured size is not enough: a single point says nothing of the fixed cost
    s = RequestScheduler(max_batch_size=8)
    measure(s, "k", 8, 2.4)
    assert s.estimated_step_seconds("k", 2) is None
    short_and_long(s)
    assert s.schedule(1.0).batch == ["short0", "short1"]


def test_flat_step_cost_lets_long_requests_fill_a_short_batch():
    s = RequestScheduler(max_batch_size=8)
    measure(s, "k", 1, 1.0)
    measure(s, "k", 4, 1.0)
    short_and_long(s)
    assert len(s.schedule(1.0).batch) == 8


def test_short_requests_batch_together_up_to_the_batch_size():
    s = RequestScheduler(max_batch_size=4)
    short_and_long(s, num_short=6)
    batch = s.schedule(1.0).batch
    assert len(batch) == 4 and all(r.startswith("short") for r in batch)


def test_fast_lane_off_fills_the_batch_as_before():
    s = RequestScheduler(max_batch_size=8, fast_lane_max_steps=0)
    short_and_long(s)
    batch = s.schedule(1.0).batch
    assert batch[:2] == ["short0", "short1"] and len(batch) == 8


def test_a_long_head_fills_its_batch_with_short_and_long_requests():
    s = RequestScheduler(max_batch_size=8)
    short_and_long(s, num_short=2, num_long=6)
    out = s.schedule(1.0)
    assert out.batch == ["short0", "short1"]
    s.update(out.batch, 79.0)  # a slow step: the long ones have waited ~80 s, credit 40 > 30 steps
    batch = s.schedule(80.0).batch
    assert batch[0].startswith("long") and len(batch) == 8 and {"short0", "short1"} <= set(batch)


def test_fast_lane_does_not_starve_long_requests_of_the_same_key():
    # A 4-step request arrives every 4 steps, so a short one is always running; a long step
    # costs 0.1 + 1.0 * images, too much for the stretch, so the long request never rides
    # along: it runs only as the head, which WAIT_CREDIT makes it, and then fills the batch.
    s = RequestScheduler(max_batch_size=4, max_running_images=100)
    s.add(req("long", steps=10, arrival=0.0))
    finished_at: dict[str, int] = {}
    batches = []
    for t in range(1, 400):
        if t % 4 == 1 and t < 300:
            s.add(req(f"short{t}", steps=4, arrival=float(t)))
        out = s.schedule(float(t))
        if not out.batch:
            break
        batches.append(out.batch)
        images = len(out.batch)
        for done in s.update(out.batch, float(t), step_seconds=0.1 + 1.0 * images):
            finished_at[done] = t
    assert finished_at["long"] < 300  # while short requests still arrive
    with_long = [b for b in batches if "long" in b]
    assert len(with_long) == 10 and all(b[0] == "long" and len(b) == 2 for b in with_long)
    shorts = {k: v for k, v in finished_at.items() if k.startswith("short")}
    assert shorts and all(v - int(k[5:]) + 1 <= 5 for k, v in shorts.items()), shorts


def test_fast_lane_settings_are_validated_by_name():
    from impasto.config import SchedulerConfig, load_config

    with pytest.raises(ValueError, match="fast_lane_max_steps"):
        RequestScheduler(2, fast_lane_max_steps=-1)
    with pytest.raises(ValueError, match="fast_lane_max_stretch"):
        RequestScheduler(2, fast_lane_max_stretch=0.9)
    with pytest.raises(ValueError, match="scheduler.fast_lane_max_steps"):
        SchedulerConfig(fast_lane_max_steps=-1).validate()
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match="scheduler.fast_lane_max_stretch"):
            SchedulerConfig(fast_lane_max_stretch=bad).validate()
    assert (SchedulerConfig().fast_lane_max_steps, SchedulerConfig().fast_lane_max_stretch) == (8, 1.5)
    config = load_config(None, fast_lane_max_steps=0, fast_lane_max_stretch=2.0)
    assert (config.scheduler.fast_lane_max_steps, config.scheduler.fast_lane_max_stretch) == (0, 2.0)


def test_fast_lane_settings_come_from_toml_and_flags(tmp_path):
    from impasto.cli import build_parser
    from impasto.config import load_config

    path = tmp_path / "impasto.toml"
    path.write_text("[scheduler]\nfast_lane_max_steps = 6\nfast_lane_max_stretch = 1.25\n")
    config = load_config(path)
    assert (config.scheduler.fast_lane_max_steps, config.scheduler.fast_lane_max_stretch) == (6, 1.25)
    args = build_parser().parse_args(["serve", "--fast-lane-max-steps", "0", "--fast-lane-max-stretch", "2"])
    assert (args.fast_lane_max_steps, args.fast_lane_max_stretch) == (0, 2.0)


def test_step_time_tables_are_bounded_by_batch_key_count():
    # A LoRA weight schedule gives every request its own batch key.
    from impasto.core.scheduler import MAX_COST_KEYS, RequestScheduler, ScheduledRequest

    s = RequestScheduler(max_batch_size=4)
    for i in range(MAX_COST_KEYS + 50):
        s.add(ScheduledRequest(f"r{i}", ("key", i), 1, 1, arrival=float(i)))
        out = s.schedule(float(i))
        s.update(out.batch, float(i) + 0.5, 0.01)
    assert len(s._step_seconds) <= MAX_COST_KEYS and len(s._size_seconds) <= MAX_COST_KEYS
