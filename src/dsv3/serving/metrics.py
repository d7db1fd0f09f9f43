"""Prometheus text-format metrics for the server (counters, gauges, histograms), no extra dependency."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class ServerMetrics:
    """All server metrics; thread-safe updates (the engine thread and the event loop both write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests_total = 0
        self.requests_failed = 0
        self.requests_rejected = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.spec_drafted = 0
        self.spec_accepted = 0

    def inc(self, name: str, value: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + value)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            getattr(self, name).observe(value)

    def render(
        self, gauges: dict[str, float], expert_load: Callable[[], list[list[float]]] | None = None
    ) -> str:
        """Prometheus exposition format 0.0.4."""
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_text: str, body: list[str]) -> None:
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(body)

            metric(
                "dsv3_requests_total",
                "counter",
                "Requests received.",
                [f"dsv3_requests_total {self.requests_total}"],
            )
            metric(
                "dsv3_requests_failed_total",
                "counter",
                "Requests that ended in an error.",
                [f"dsv3_requests_failed_total {self.requests_failed}"],
            )
            metric(
                "dsv3_requests_rejected_total",
                "counter",
                "Requests refused because the queue was full.",
                [f"dsv3_requests_rejected_total {self.requests_rejected}"],
            )
            metric(
                "dsv3_prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                [f"dsv3_prompt_tokens_total {self.prompt_tokens}"],
            )
            metric(
                "dsv3_generation_tokens_total",
                "counter",
                "Tokens generated.",
                [f"dsv3_generation_tokens_total {self.completion_tokens}"],
            )
            for name, value in gauges.items():
                metric(
                    f"dsv3_{name}",
                    "gauge",
                    name.replace("_", " ").capitalize() + ".",
                    [f"dsv3_{name} {value}"],
                )
            metric(
                "dsv3_time_to_first_token_seconds",
                "histogram",
                "Time from request arrival to its first token.",
                self.ttft.lines("dsv3_time_to_first_token_seconds"),
            )
            metric(
                "dsv3_inter_token_latency_seconds",
                "histogram",
                "Time between consecutive tokens of a request.",
                self.itl.lines("dsv3_inter_token_latency_seconds"),
            )
            rate = self.spec_accepted / self.spec_drafted if self.spec_drafted else 0.0
            metric(
                "dsv3_spec_decode_acceptance_rate",
                "gauge",
                "Fraction of MTP draft tokens accepted.",
                [f"dsv3_spec_decode_acceptance_rate {rate:.6f}"],
            )
        if expert_load is not None:
            load = expert_load()
            if load:
                body = [
                    f'dsv3_expert_load_tokens{{layer="{layer}",expert="{e}"}} {int(v)}'
                    for layer, row in enumerate(load)
                    for e, v in enumerate(row)
                ]
                lines.append("# HELP dsv3_expert_load_tokens Tokens routed to each expert (sliding window).")
                lines.append("# TYPE dsv3_expert_load_tokens gauge")
                lines.extend(body)
        return "\n".join(lines) + "\n"
