"""The 95% interval the benchmarks print beside a judged hit rate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_common import rate_with_interval, wilson_interval  # noqa: E402


def test_wilson_interval_by_its_closed_forms():
    z2 = 1.96**2
    # No hits: the interval is [0, z²/(n+z²)]; all hits: its mirror.
    assert wilson_interval(0.0, 32) == pytest.approx((0.0, z2 / (32 + z2)))
    assert wilson_interval(1.0, 32) == pytest.approx((32 / (32 + z2), 1.0))
    # Half the hits: centred on 1/2, half-width z·sqrt(n/4 + z²/4)/(n + z²).
    lo, hi = wilson_interval(0.5, 80)
    assert (lo + hi) / 2 == pytest.approx(0.5)
    assert (hi - lo) / 2 == pytest.approx(1.96 * (80 / 4 + z2 / 4) ** 0.5 / (80 + z2))


def test_the_pink_figure_cannot_tell_69_from_a_70_bar():
    lo, hi = wilson_interval(0.69, 80)
    assert lo < 0.6 and hi > 0.75
    assert rate_with_interval(0.69, 80) == "69% [58-78%]"
    assert wilson_interval(0.7, 0) == (0.0, 1.0)
