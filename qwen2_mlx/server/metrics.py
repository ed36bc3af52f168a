"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client
library: counters the engine and the HTTP layer increment, gauges read when scraped, and
histograms of time to first token, inter-token latency and queue wait."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable

PREFIX = "qwen2_mlx"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: `le` upper bounds, +Inf last)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def lines(self, name: str) -> list[str]:
        with self._lock:
            counts, total, count = list(self.counts), self.sum, self.count
        out, running = [], 0
        for bound, c in zip((*self.buckets, float("inf")), counts, strict=True):
            running += c
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {total:.6f}", f"{name}_count {count}"]
        return out


class Metrics:
    """Everything /metrics reports. Plain int counters are written by one thread each (the
    engine's or the event loop's), so they need no lock."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.prefill_tokens = 0
        self.cached_tokens = 0
        self.generation_tokens = 0
        self.decode_steps = 0
        self.decode_rows = 0
        self.prompt_cache_lookups = 0
        self.cancelled_sequences = 0
        self.speculative_rounds = 0
        self.speculative_drafted_tokens = 0
        self.speculative_accepted_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.queue_wait = Histogram()

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def render(self, gauges: Callable[[], dict[str, tuple[str, float]]]) -> str:
        """The exposition text; `gauges()` gives name -> (help, value) read right now."""
        out: list[str] = []

        def metric(name: str, kind: str, text: str, lines: list[str]) -> None:
            out.extend([f"# HELP {PREFIX}_{name} {text}", f"# TYPE {PREFIX}_{name} {kind}"])
            out.extend(f"{PREFIX}_{line}" for line in lines)

        metric("requests_total", "counter", "HTTP requests by endpoint and status code.",
               [f'requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())])
        for name, value, text in (
            ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of started requests."),
            ("prefill_tokens_total", self.prefill_tokens,
             "Prompt tokens computed by prefill (not taken from the prefix cache)."),
            ("generation_tokens_total", self.generation_tokens, "Tokens generated."),
            ("decode_steps_total", self.decode_steps, "Batched decode forward passes."),
            ("decode_rows_total", self.decode_rows,
             "Sequences decoded, summed over decode steps (rows / steps = mean batch size)."),
            ("prompt_cache_lookups_total", self.prompt_cache_lookups,
             "Prompts looked up in the prefix cache."),
            ("prompt_cache_cached_tokens_total", self.cached_tokens,
             "Prompt tokens reused from the prefix cache."),
            ("cancelled_sequences_total", self.cancelled_sequences,
             "Sequences dropped because their client went away."),
            ("speculative_rounds_total", self.speculative_rounds,
             "Speculative rounds (--draft-model): one target pass each, also counted in "
             "decode_steps_total."),
            ("speculative_drafted_tokens_total", self.speculative_drafted_tokens,
             "Tokens proposed by the draft model."),
            ("speculative_accepted_tokens_total", self.speculative_accepted_tokens,
             "Drafted tokens accepted and sent (accepted / drafted = acceptance rate)."),
        ):
            metric(name, "counter", text, [f"{name} {value}"])
        for name, (text, value) in gauges().items():
            metric(name, "gauge", text, [f"{name} {value:g}"])
        for name, hist, text in (
            ("time_to_first_token_seconds", self.ttft, "Request arrival to its first token."),
            ("inter_token_latency_seconds", self.itl, "Time between a sequence's tokens."),
            ("queue_wait_seconds", self.queue_wait, "Time a request waited to start."),
        ):
            metric(name, "histogram", text, hist.lines(name))
        return "\n".join(out) + "\n"
