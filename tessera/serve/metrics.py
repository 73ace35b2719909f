"""Counters for GET /metrics, rendered in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.serve.protocol import EncodedImage

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    requests: int = 0  # requests handed to the engine
    rejected: int = 0  # 429s
    errors: dict[int, int] = field(default_factory=dict)  # HTTP status → count of error responses
    prompt_tokens: int = 0
    images: int = 0
    visual_tokens: int = 0
    visual_tokens_saved: int = 0  # vs. every tile at 1/4
    compressed_tiles: int = 0
    cache_hits: int = 0  # images served from a feature cache
    ttft_counts: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))
    ttft_sum: float = 0.0

    def record_images(self, images: list[EncodedImage]) -> None:
        for im in images:
            self.images += 1
            self.visual_tokens += im.meta.rows
            self.visual_tokens_saved += im.meta.full_tokens - im.meta.rows
            self.compressed_tiles += im.meta.compressed_tiles
            self.cache_hits += int(im.meta.cache_hit)

    def record_error(self, status: int) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        for i, edge in enumerate(TTFT_BUCKETS):
            if seconds <= edge:
                self.ttft_counts[i] += 1
                return
        self.ttft_counts[-1] += 1

    def render(self, status: dict) -> str:
        e, v = status["engine"], status["vision"]
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP tessera_{name} {help_text}")
            lines.append(f"# TYPE tessera_{name} {kind}")
            for labels, value in samples:
                lines.append(
                    f"tessera_{name}{labels} {value:g}"
                    if isinstance(value, float)
                    else f"tessera_{name}{labels} {value}"
                )

        metric(
            "queue_depth",
            "gauge",
            "Requests waiting: for the engine, and for their image features.",
            [('{stage="engine"}', e.waiting), ('{stage="vision"}', status["vision_inflight"])],
        )
        metric(
            "running_batch", "gauge", "Sequences in the engine's running batch.", [("", e.running)]
        )
        metric(
            "generation_tokens_per_second",
            "gauge",
            "Tokens generated per second over the last few seconds.",
            [("", float(round(e.tokens_per_second, 3)))],
        )
        metric(
            "generation_tokens_total", "counter", "Tokens generated.", [("", e.generated_tokens)]
        )
        metric(
            "prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", self.prompt_tokens)]
        )
        metric("requests_total", "counter", "Requests handed to the engine.", [("", self.requests)])
        metric(
            "rejected_total",
            "counter",
            "Requests refused with 429 (queues full).",
            [("", self.rejected)],
        )
        metric(
            "errors_total",
            "counter",
            "Error responses by HTTP status.",
            [(f'{{status="{s}"}}', c) for s, c in sorted(self.errors.items())]
            or [('{status="none"}', 0)],
        )
        metric(
            "images_total", "counter", "Images encoded (or served from cache).", [("", self.images)]
        )
        metric(
            "visual_tokens_total",
            "counter",
            "Visual tokens placed in prompts.",
            [("", self.visual_tokens)],
        )
        metric(
            "visual_tokens_saved_total",
            "counter",
            "Visual tokens saved by routing, versus every tile at 1/4.",
            [("", self.visual_tokens_saved)],
        )
        metric(
            "compressed_tiles_total",
            "counter",
            "Tiles sent through the 1/16 branch.",
            [("", self.compressed_tiles)],
        )
        metric(
            "vision_cache_hits_total",
            "counter",
            "Images whose features came from a feature cache.",
            [("", self.cache_hits)],
        )
        metric(
            "vision_workers",
            "gauge",
            "Vision workers by state.",
            [
                ('{state="alive"}', v.get("workers_alive", 0)),
                ('{state="total"}', v.get("workers_total", 0)),
            ],
        )
        lines.append(
            "# HELP tessera_time_to_first_token_seconds Time from arrival to the first generated token."
        )
        lines.append("# TYPE tessera_time_to_first_token_seconds histogram")
        cum = 0
        for edge, count in zip(TTFT_BUCKETS, self.ttft_counts):
            cum += count
            lines.append(f'tessera_time_to_first_token_seconds_bucket{{le="{edge}"}} {cum}')
        cum += self.ttft_counts[-1]
        lines.append(f'tessera_time_to_first_token_seconds_bucket{{le="+Inf"}} {cum}')
        lines.append(f"tessera_time_to_first_token_seconds_sum {self.ttft_sum:.6f}")
        lines.append(f"tessera_time_to_first_token_seconds_count {cum}")
        return "\n".join(lines) + "\n"
