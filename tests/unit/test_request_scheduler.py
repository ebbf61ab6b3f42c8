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


def test_batch_size_one_is_fcfs_one_at_a_time():
    s = RequestScheduler(max_batch_size=1)
    for i, rid in enumerate("abc"):
        s.add(req(rid, steps=2, arrival=i))
    assert run_to_end(s) == [["a"], ["a"], ["b"], ["b"], ["c"], ["c"]]


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


def test_different_batch_keys_alternate():
    s = RequestScheduler(max_batch_size=4)
    s.add(req("small", key="64x64", steps=2, arrival=0))
    s.add(req("large", key="128x128", steps=2, arrival=1))
    trace = run_to_end(s)
    assert trace == [["small"], ["large"], ["small"], ["large"]]


def test_batch_is_capped_in_images_and_a_big_request_runs_alone():
    s = RequestScheduler(max_batch_size=3)
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
