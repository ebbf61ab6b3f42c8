"""Turn a LoadResult into numbers: per request class and overall, a dict for JSON and a table.

Latency and time to first progress event are measured from each request's arrival (see
load.py). images/s counts images received over the run's duration. `eta_ratio` is the time the
request actually took after its first progress event divided by the ETA that event announced
(1.0 is a perfect ETA; above 1 the server was optimistic).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .load import LoadResult, RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"p{q}": _finite(percentile(values, q)) for q in PERCENTILES}
    out["mean"] = _finite(sum(values) / len(values)) if values else None
    out["max"] = max(values) if values else None
    return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def _group(records: Sequence[RequestRecord], duration: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    images = sum(r.num_images for r in ok)
    eta_ratios = [
        (r.finished - r.first_progress) / r.first_eta for r in ok if r.first_progress is not None and r.first_eta and r.first_eta > 0
    ]
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_errors": len(records) - len(ok),
        "errors": dict(Counter(r.error or "UNFINISHED" for r in records if not r.ok)),
        "num_images": images,
        "images_per_s": images / duration if duration > 0 else None,
        "latency_s": distribution([r.latency for r in ok]),
        "time_to_first_progress_s": distribution([r.time_to_first_progress for r in ok if r.first_progress is not None]),
        "eta_ratio": distribution(eta_ratios),
    }


def summarize(result: LoadResult, class_order: Sequence[str] | None = None) -> dict[str, Any]:
    """The JSON report of one run. Classes appear in `class_order` (else first-seen order)."""
    names = list(class_order) if class_order else list(dict.fromkeys(r.class_name for r in result.records))
    return {
        "mode": result.mode,
        "rate_per_s": result.rate,
        "concurrency": result.concurrency,
        "started_at": result.started_at,
        "duration_s": result.duration,
        "classes": {name: _group([r for r in result.records if r.class_name == name], result.duration) for name in names},
        "all": _group(result.records, result.duration),
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, g in [*summary["classes"].items(), ("all", summary["all"])]:
        lat, ttfp = g["latency_s"], g["time_to_first_progress_s"]
        rows.append(
            [
                name,
                str(g["num_requests"]),
                str(g["num_errors"]),
                str(g["num_images"]),
                "-" if g["images_per_s"] is None else f"{g['images_per_s']:.2f}",
                _ms(lat["p50"]),
                _ms(lat["p90"]),
                _ms(lat["p99"]),
                _ms(ttfp["p50"]),
                _ms(ttfp["p99"]),
            ]
        )
    return rows


TABLE_HEADERS = ["class", "requests", "errors", "images", "images/s", "p50 ms", "p90 ms", "p99 ms", "TTFP p50 ms", "TTFP p99 ms"]


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of one run, with a title line naming the load."""
    if summary["mode"] == "open_loop":
        title = f"open loop, {summary['rate_per_s']:.3g} requests/s (Poisson), at most {summary['concurrency']} in flight"
    else:
        title = f"closed loop, {summary['concurrency']} concurrent clients"
    title += f", {summary['duration_s']:.1f} s"
    cells = table_rows(summary)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(TABLE_HEADERS)]
    lines = [title, " | ".join(h.ljust(w) for h, w in zip(TABLE_HEADERS, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    errors = summary["all"]["errors"]
    if errors:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(errors.items())))
    return "\n".join(lines)
