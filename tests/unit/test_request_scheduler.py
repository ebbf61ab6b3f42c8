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
