"""A load generator for any running impasto server, as perf_analyzer is for Triton.

    python -m impasto_client.bench --target localhost:50051 --rate 2 --requests 50
    python -m impasto_client.bench --target localhost:50051 --concurrency 1,4,16 --workload mix.toml

Modules, one job each: `workload` (the request mix), `load` (open- and closed-loop load),
`report` (percentiles, table, JSON), `cli` (the command line). Needs only the client package.
"""

from .load import LoadResult, RequestRecord, poisson_arrivals, run_closed_loop, run_open_loop, warm_up
from .report import format_table, summarize
from .workload import PlannedRequest, RequestClass, Workload, load_workload, parse_class_spec, plan_requests

__all__ = [
    "LoadResult",
    "PlannedRequest",
    "RequestClass",
    "RequestRecord",
    "Workload",
    "format_table",
    "load_workload",
    "parse_class_spec",
    "plan_requests",
    "poisson_arrivals",
    "run_closed_loop",
    "run_open_loop",
    "summarize",
    "warm_up",
]
