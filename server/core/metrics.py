"""Prometheus metrics of one server. Each server gets its own registry, so several servers in
one process (tests, benchmarks) never collide on metric names.

Exposed on `--metrics-port` at /metrics. Images/s is `rate(impasto_images_total[1m])`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Step latencies on this CPU run from ~5 ms (tiny model) to seconds (SD 1.5 at 512²).
_SECONDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("impasto_queue_length", "Requests waiting to be admitted", registry=r)
        self.running = Gauge("impasto_running_requests", "Requests admitted and not finished", registry=r)
        self.batch_size = Histogram(
            "impasto_batch_size", "Images per UNet call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r
        )
        self.unet_step_seconds = Histogram("impasto_unet_step_seconds", "One step of the loop: UNet call and sampler updates", buckets=_SECONDS, registry=r)
        self.time_to_first_progress = Histogram(
            "impasto_time_to_first_progress_seconds", "From a request's arrival to its first progress event", buckets=_SECONDS, registry=r
        )
        self.images = Counter("impasto_images", "Images generated", registry=r)
        self.requests = Counter("impasto_requests", "Requests ended, by outcome", ["outcome"], registry=r)
        self.cancellations = Counter("impasto_cancellations", "Requests cancelled by their client (cancel, disconnect, deadline)", registry=r)
        self.torch_fallbacks = Counter(
            "impasto_torch_fallbacks", "UNet calls run on the torch fallback because no compiled engine fitted", ["reason"], registry=r
        )
        self.adapter_switch_seconds = Histogram(
            "impasto_adapter_switch_seconds",
            "Refitting an engine to another LoRA adapter set (merged weights from the cache or composed)",
            ["component"],
            buckets=_SECONDS,
            registry=r,
        )
        self.adapter_cache_bytes = Gauge("impasto_adapter_cache_bytes", "Bytes of merged LoRA weights kept for switching", registry=r)
        self.embedding_cache_hits = Counter("impasto_text_embedding_cache_hits", "Prompt chunks served from the embedding cache", registry=r)
        self.embedding_cache_misses = Counter("impasto_text_embedding_cache_misses", "Prompt chunks run through the text encoder", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if getattr(self, "_http", None) is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
