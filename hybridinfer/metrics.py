"""One metrics vocabulary: the table below is what the server's /metrics, `bench`'s JSON and `plan`'s predictions
call each figure. A figure has one name everywhere (its JSON key); Prometheus exposes it as `hybridinfer_<name>`.

Timing names follow vLLM's `bench serve`: TTFT, TPOT, ITL, E2E.
TTFT has one definition for streamed and non-streamed requests: from the moment the server admitted the request
(queue wait included) to the first generated token. Streamed: when the first token's chunk arrives from the engine;
non-streamed: engine call start + the engine's own prompt time (`timings.prompt_ms`), since no chunk is seen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str     # the one name: JSON key in bench/plan, `hybridinfer_<name>` in Prometheus
    unit: str
    meaning: str


TABLE: tuple[Metric, ...] = (
    Metric("ttft_s", "s", "time to first token: request admitted (queue wait included) to the first generated token"),
    Metric("tpot_s", "s", "time per output token after the first: (E2E - TTFT) / (output tokens - 1)"),
    Metric("itl_s", "s", "inter-token latency: gap between consecutive streamed chunks"),
    Metric("e2e_s", "s", "end-to-end request latency: admitted to the last byte"),
    Metric("queue_wait_s", "s", "time a request waited for a slot"),
    Metric("decode_tps", "tokens/s", "decode speed of one request: output tokens after the first / time since the first"),
    Metric("prefill_tps", "tokens/s", "prompt processing speed"),
    Metric("prompt_tokens", "tokens", "prompt tokens processed (usage.prompt_tokens)"),
    Metric("cached_prompt_tokens", "tokens", "prompt tokens reused from the engine's cache (not recomputed)"),
    Metric("completion_tokens", "tokens", "tokens generated (usage.completion_tokens)"),
    Metric("requests", "requests", "requests answered, by endpoint and HTTP status (499: the client left)"),
    Metric("requests_cancelled", "requests", "requests whose client left before the answer was complete"),
    Metric("requests_in_flight", "requests", "requests holding an engine slot"),
    Metric("requests_queued", "requests", "requests admitted and waiting for a slot"),
    Metric("engine_up", "bool", "1 when the engine answers, 0 while it loads or restarts"),
    Metric("engine_restarts", "restarts", "times the engine was restarted after dying while serving"),
    Metric("cache_ram_bytes", "bytes", "RAM the engine may use to keep prompt prefixes (its --cache-ram, as planned)"),
    Metric("prompt_cache_restores", "restores", "conversations whose KV state was restored from the prompt cache on disk"),
    Metric("prompt_cache_restored_tokens", "tokens", "tokens restored from the prompt cache on disk (not prefilled)"),
    Metric("prompt_cache_saves", "saves", "KV states saved to the prompt cache on disk (slot reused, or shutdown)"),
    Metric("prompt_cache_skipped", "saves", "saves skipped: over the cap, disk full, or the engine could not write"),
    Metric("prompt_cache_rejected", "states", "saved states removed instead of restored (partial, corrupt, refused)"),
    Metric("prompt_cache_disk_bytes", "bytes", "bytes of saved KV states on disk for this model, build and context"),
    Metric("slot_affinity_hits", "requests", "chat requests sent to the free slot already holding their conversation"),
)
BY_NAME = {m.name: m for m in TABLE}

TTFT, TPOT, ITL, E2E = "ttft_s", "tpot_s", "itl_s", "e2e_s"
DECODE_TPS, PREFILL_TPS = "decode_tps", "prefill_tps"
PROMPT_TOKENS, COMPLETION_TOKENS, CACHED_PROMPT_TOKENS = "prompt_tokens", "completion_tokens", "cached_prompt_tokens"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def prom(name: str) -> str:
    """The Prometheus name of a table entry (counters get `_total` from prometheus-client)."""
    return "hybridinfer_" + BY_NAME[name].name


def _help(name: str) -> str:
    m = BY_NAME[name]
    return f"{m.meaning} ({m.unit})"


class ServerMetrics:
    """The server's /metrics through prometheus-client, on a registry of its own (one per app)."""

    def __init__(self, state=None):
        """`state`: a callable -> (engine_state, engine_restarts, in_flight, queued), read at scrape time."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(prom("requests"), _help("requests"), ["endpoint", "status"], registry=r)
        self.cancelled = Counter(prom("requests_cancelled"), _help("requests_cancelled"), registry=r)
        self.prompt_tokens = Counter(prom(PROMPT_TOKENS), _help(PROMPT_TOKENS), registry=r)
        self.cached_tokens = Counter(prom(CACHED_PROMPT_TOKENS), _help(CACHED_PROMPT_TOKENS), registry=r)
        self.completion_tokens = Counter(prom(COMPLETION_TOKENS), _help(COMPLETION_TOKENS), registry=r)
        self.ttft = Histogram(prom(TTFT), _help(TTFT), buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(prom(E2E), _help(E2E), buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(prom("queue_wait_s"), _help("queue_wait_s"), buckets=LATENCY_BUCKETS, registry=r)
        self.decode = Histogram(prom(DECODE_TPS), _help(DECODE_TPS), buckets=RATE_BUCKETS, registry=r)
        if state is not None:
            r.register(_Live(state))

    def watch_prompt_cache(self, report) -> None:
        """The prompt cache's figures (server/prompt_cache.py `report`), read at scrape time."""
        self.registry.register(_PromptCache(report))

    def request_done(self, endpoint: str, status: int, usage: dict | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        usage = usage or {}
        self.prompt_tokens.inc(usage.get("prompt_tokens") or 0)
        self.completion_tokens.inc(usage.get("completion_tokens") or 0)
        self.cached_tokens.inc((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Live:
    """Gauges read from the engine and the admission state at scrape time."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine_state, restarts, in_flight, queued = self.state()
        yield GaugeMetricFamily(prom("engine_up"), _help("engine_up"), value=1 if engine_state == "ready" else 0)
        yield CounterMetricFamily(prom("engine_restarts"), _help("engine_restarts"), value=restarts)
        yield GaugeMetricFamily(prom("requests_in_flight"), _help("requests_in_flight"), value=in_flight)
        yield GaugeMetricFamily(prom("requests_queued"), _help("requests_queued"), value=queued)


class _PromptCache:
    """The prompt cache on disk and slot affinity, from its report at scrape time."""

    COUNTERS = {"prompt_cache_restores": "restores", "prompt_cache_restored_tokens": "restored_tokens",
                "prompt_cache_saves": "saves", "prompt_cache_skipped": "skipped", "prompt_cache_rejected": "rejected",
                "slot_affinity_hits": "slot_hits"}

    def __init__(self, report):
        self.report = report

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        r = self.report()
        for name, key in self.COUNTERS.items():
            if key in r:
                yield CounterMetricFamily(prom(name), _help(name), value=r[key])
        if "disk_bytes" in r:
            yield GaugeMetricFamily(prom("prompt_cache_disk_bytes"), _help("prompt_cache_disk_bytes"), value=r["disk_bytes"])
