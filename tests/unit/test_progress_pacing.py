"""Which progress events a Generate stream sends: paced by time, never losing the first, the
last or a preview."""

from __future__ import annotations

from impasto.core.spec import Done, Progress
from impasto.rpc.progress_pacing import ProgressPacer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def sent_steps(interval_ms, step_seconds, num_steps=20, preview_every=0):
    clock = Clock()
    pacer = ProgressPacer(interval_ms, clock)
    steps = []
    for step in range(1, num_steps + 1):
        clock.now += step_seconds
        preview = b"png" if preview_every and step % preview_every == 0 else b""
        if pacer.send(Progress(step, num_steps, 0.1, preview)):
            steps.append(step)
    return steps


def test_default_is_100_ms_with_first_and_last_step():
    assert sent_steps(None, 0.012) == [1, 10, 19, 20]


def test_zero_sends_every_step():
    assert sent_steps(0, 0.001) == list(range(1, 21))


def test_slow_steps_are_all_sent():
    assert sent_steps(None, 0.2) == list(range(1, 21))


def test_previews_are_always_sent():
    assert set(range(4, 21, 4)) <= set(sent_steps(1000, 0.01, preview_every=4))


def test_other_events_always_go():
    pacer = ProgressPacer(10_000, Clock())
    assert pacer.send(Progress(1, 20, 0.1))
    assert not pacer.send(Progress(2, 20, 0.1))
    assert pacer.send(Done(num_images=1, elapsed_seconds=1.0))
