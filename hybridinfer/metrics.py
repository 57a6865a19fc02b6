"""One metrics vocabulary for the server's /metrics, the engine-log parser and `bench`.

Names follow vLLM's `bench serve`: TTFT (time to first token), TPOT (time per output token after the first),
ITL (inter-token latency), E2E (request latency).
"""

from __future__ import annotations

import threading

TTFT = "ttft_s"
TPOT = "tpot_s"
ITL = "itl_s"
E2E = "e2e_s"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
REASONING_TOKENS = "reasoning_tokens"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Histogram:
    def __init__(self, name: str, help_: str, buckets):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            out.append(f'{self.name}_bucket{{le="{b}"}} {c}')
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return out


class ServerMetrics:
    """Prometheus text exposition, no dependency. Prefix `hybridinfer_`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self.queued = 0
        self.cancelled = 0
        self.ttft = Histogram("hybridinfer_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS)
        self.e2e = Histogram("hybridinfer_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS)
        self.tps = Histogram("hybridinfer_decode_tokens_per_second", "Per-request decode speed", RATE_BUCKETS)

    def request_done(self, endpoint: str, status: int, prompt: int = 0, completion: int = 0) -> None:
        with self._lock:
            k = (endpoint, str(status))
            self.requests[k] = self.requests.get(k, 0) + 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self, engine_state: str, engine_restarts: int) -> str:
        lines = ["# HELP hybridinfer_requests_total Requests by endpoint and status", "# TYPE hybridinfer_requests_total counter"]
        for (ep, st), n in sorted(self.requests.items()):
            lines.append(f'hybridinfer_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
        lines += [
            "# TYPE hybridinfer_prompt_tokens_total counter", f"hybridinfer_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE hybridinfer_completion_tokens_total counter", f"hybridinfer_completion_tokens_total {self.completion_tokens}",
            "# TYPE hybridinfer_requests_in_flight gauge", f"hybridinfer_requests_in_flight {self.in_flight}",
            "# TYPE hybridinfer_requests_queued gauge", f"hybridinfer_requests_queued {self.queued}",
            "# TYPE hybridinfer_requests_cancelled_total counter", f"hybridinfer_requests_cancelled_total {self.cancelled}",
            "# TYPE hybridinfer_engine_up gauge", f"hybridinfer_engine_up {1 if engine_state == 'ready' else 0}",
            "# TYPE hybridinfer_engine_restarts_total counter", f"hybridinfer_engine_restarts_total {engine_restarts}",
        ]
        for h in (self.ttft, self.e2e, self.tps):
            lines += h.render()
        return "\n".join(lines) + "\n"
