"""Every Prometheus metric of the stack, defined here once, and the small calls that feed them.

Edges observe what a client sees (edge/live.py, edge/http_api.py and the admission code);
workers observe what their stage did (the prefill, decode and aggregated services, the worker
shell, and vLLM's per-step scheduler stats through inference/vllm_stats.py). Everything lives in
one registry per process: one process may hold an edge and several workers (the tests do), and
then one scrape shows them all, told apart by their labels.

Latency histograms carry the request id as an exemplar, so a slow bucket on a dashboard leads
to one request's logs (`request_id` is bound on every log line) and its bus traffic
(`grokstack trace <request id>`). Exemplars only travel in the OpenMetrics format, which
`exposition` serves when the scraper asks for it (Prometheus does, with exemplar storage on).
"""

from __future__ import annotations

from functools import partial

import prometheus_client
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.exposition import choose_encoder

from bus.messages import FinalEvent, PrefillStats

# The stack's own registry, not prometheus_client's default one: vLLM registers its `vllm:*`
# metrics there, and some of them clash in OpenMetrics (`..._per_pos` and `..._per_pos_total`),
# which makes a whole OpenMetrics scrape unparseable. Everything the dashboards need is here.
REGISTRY = CollectorRegistry()
Counter = partial(prometheus_client.Counter, registry=REGISTRY)
Gauge = partial(prometheus_client.Gauge, registry=REGISTRY)
Histogram = partial(prometheus_client.Histogram, registry=REGISTRY)
# process_start_time_seconds, CPU and memory: `grokstack cost --metrics` takes workers' uptime from it
prometheus_client.ProcessCollector(registry=REGISTRY)

# Bucket bounds in seconds, spanning what this stack sees on a CPU (slow) and on GPUs (fast).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
PREFILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

EDGE = ["region", "priority"]

# ---------------------------------------------------------------------------- edge

TIME_TO_FIRST_TOKEN = Histogram(
    "grokstack_time_to_first_token_seconds",
    "Edge: from the request's acceptance (stored in JetStream) to its first token event.",
    EDGE, buckets=TTFT_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "grokstack_inter_token_latency_seconds",
    "Edge: gap between consecutive tokens; a frame of n tokens after a gap g counts n gaps of g/n.",
    EDGE, buckets=ITL_BUCKETS)
E2E_LATENCY = Histogram(
    "grokstack_e2e_request_latency_seconds",
    "Edge: from acceptance to the last event; outcome is the finish reason or the error code.",
    [*EDGE, "outcome"], buckets=E2E_BUCKETS)
ACTIVE_STREAMS = Gauge(
    "grokstack_active_streams", "Edge: requests in flight on this edge (accepted, not yet finished).")
EDGE_PROMPT_TOKENS = Counter(
    "grokstack_edge_prompt_tokens_total", "Edge: prompt tokens of finished requests (final event usage).", EDGE)
EDGE_GENERATION_TOKENS = Counter(
    "grokstack_edge_generation_tokens_total",
    "Edge: completion tokens of finished requests (final event usage).", EDGE)
REQUESTS_REFUSED = Counter(
    "grokstack_requests_refused_total",
    "Edge: requests refused at admission, by reason (overloaded, rate_limited, too_many_requests, unavailable).",
    ["priority", "reason"])
QUEUE_DEPTH = Gauge(
    "grokstack_queue_depth", "Edge: jobs waiting in a work queue (kind req or decode), as the edge last read it.",
    ["kind", "region", "priority"])
QUEUE_WAIT_ESTIMATE = Gauge(
    "grokstack_queue_wait_estimate_seconds",
    "Edge: estimated wait of a new request of this priority (admission control's input).", EDGE)

# ---------------------------------------------------------------------------- workers

QUEUE_TIME = Histogram(
    "grokstack_request_queue_time_seconds",
    "Worker: from publish to a worker taking the job; stage prefill (request) or decode (decode job).",
    ["stage", "priority"], buckets=QUEUE_BUCKETS)
PREFILL_TIME = Histogram(
    "grokstack_request_prefill_time_seconds", "Worker: time to compute the prompt and its first token.",
    ["priority"], buckets=PREFILL_BUCKETS)
PROMPT_TOKENS = Counter(
    "grokstack_prompt_tokens_total", "Worker: prompt tokens processed (cached ones included).", ["role"])
GENERATION_TOKENS = Counter(
    "grokstack_generation_tokens_total", "Worker: completion tokens generated.", ["role"])
KV_TRANSFER_BYTES = Counter(
    "grokstack_kv_transfer_bytes_total", "Worker: KV cache bytes written to or read from Redis.", ["direction"])
KV_TRANSFER_TIME = Histogram(
    "grokstack_kv_transfer_seconds", "Worker: time to write (prefill) or read (decode) a request's KV blocks.",
    ["direction"], buckets=TRANSFER_BUCKETS)
KV_QUERY_TOKENS = Counter(
    "grokstack_kv_cache_query_tokens_total",
    "Worker: tokens looked up in the KV cache (prefill: the prompt; decode: what the KV handle named).", ["stage"])
KV_HIT_TOKENS = Counter(
    "grokstack_kv_cache_hit_tokens_total",
    "Worker: tokens found in the KV cache (prefill: cached prompt tokens; decode: tokens loaded).", ["stage"])
KV_RECOMPUTES = Counter(
    "grokstack_kv_recomputes_total", "Worker: decode could not use the KV handle and computed the prompt itself.")
SPEC_DRAFTS = Counter(
    "grokstack_spec_decode_drafts_total", "Worker: speculative drafts proposed (vLLM scheduler stats).", ["role"])
SPEC_DRAFT_TOKENS = Counter(
    "grokstack_spec_decode_draft_tokens_total", "Worker: draft tokens proposed (vLLM scheduler stats).", ["role"])
SPEC_ACCEPTED_TOKENS = Counter(
    "grokstack_spec_decode_accepted_tokens_total", "Worker: draft tokens the target model accepted (vLLM).",
    ["role"])
KV_CACHE_USAGE = Gauge(
    "grokstack_kv_cache_usage_ratio", "Worker: share of the engine's KV cache blocks in use (vLLM).", ["role"])
DEAD_LETTERS = Counter(
    "grokstack_dead_letters_total", "Messages dead-lettered, by work kind (req, decode).", ["kind"])
GPU_SECONDS = Counter(
    "grokstack_gpu_seconds_total", "Worker: accelerator-seconds attributed to requests (their share of batches).",
    ["role"])
COST_USD = Counter(
    "grokstack_cost_usd_total", "Worker: cost of the attributed accelerator time, in US dollars.", ["role"])
BUSY_SECONDS = Counter(
    "grokstack_worker_busy_seconds_total", "Worker: wall time with at least one job running (utilization).",
    ["role"])
BUDGET_TOKENS = Gauge(
    "grokstack_worker_budget_tokens", "Worker: tokens of work the worker may hold at once.", ["role"])
RESERVED_TOKENS = Gauge(
    "grokstack_worker_reserved_tokens", "Worker: tokens its running jobs hold now.", ["role"])
JOBS = Counter(
    "grokstack_jobs_total", "Worker: jobs ended, by outcome (served, cancelled, refused, failed, dead_lettered).",
    ["role", "outcome"])


def _ex(request_id: str) -> dict[str, str] | None:
    return {"request_id": request_id} if request_id else None


# ---------------------------------------------------------------------------- edge calls

def observe_first_token(region: str, priority: str, seconds: float, request_id: str = "") -> None:
    TIME_TO_FIRST_TOKEN.labels(region, priority).observe(seconds, _ex(request_id))


def observe_token_gap(region: str, priority: str, gap_s: float, tokens: int, request_id: str = "") -> None:
    """A frame of `tokens` tokens arrived `gap_s` after the previous one: that many gaps of
    gap_s / tokens, so a worker that batches tokens into frames reads the same as one that doesn't."""
    n = max(1, tokens)
    child = INTER_TOKEN_LATENCY.labels(region, priority)
    for _ in range(n):
        child.observe(gap_s / n, _ex(request_id))


def observe_request_end(region: str, priority: str, seconds: float, outcome: str, request_id: str = "",
                        prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    E2E_LATENCY.labels(region, priority, outcome).observe(seconds, _ex(request_id))
    if prompt_tokens:
        EDGE_PROMPT_TOKENS.labels(region, priority).inc(prompt_tokens)
    if completion_tokens:
        EDGE_GENERATION_TOKENS.labels(region, priority).inc(completion_tokens)


def stream_started() -> None:
    ACTIVE_STREAMS.inc()


def stream_ended() -> None:
    ACTIVE_STREAMS.dec()


def observe_refused(reason: str, priority: str) -> None:
    REQUESTS_REFUSED.labels(priority, reason).inc()


def set_queue_depth(kind: str, region: str, priority: str, depth: int) -> None:
    QUEUE_DEPTH.labels(kind, region, priority).set(depth)


def set_queue_wait(region: str, priority: str, seconds: float) -> None:
    QUEUE_WAIT_ESTIMATE.labels(region, priority).set(seconds)


# ---------------------------------------------------------------------------- worker calls

def observe_prefill(priority: str, request_id: str, stats: PrefillStats, prompt_tokens: int,
                    usd: float = 0.0) -> None:
    """A prefill worker published the decode job of one request."""
    ex = _ex(request_id)
    QUEUE_TIME.labels("prefill", priority).observe(stats.queue_ms / 1000, ex)
    PREFILL_TIME.labels(priority).observe(stats.prefill_ms / 1000, ex)
    _kv_transfer("write", stats.kv_bytes_written, stats.kv_write_ms, ex)
    KV_QUERY_TOKENS.labels("prefill").inc(prompt_tokens)
    KV_HIT_TOKENS.labels("prefill").inc(stats.cached_tokens)
    PROMPT_TOKENS.labels("prefill").inc(prompt_tokens)
    _cost("prefill", stats.gpu_s, usd)


def observe_final(role: str, priority: str, event: FinalEvent, handle_tokens: int | None = None) -> None:
    """A decode or aggregated worker finished a request. A decode worker counts only its own
    stage (prefill counted the rest in observe_prefill); an aggregated worker counts both.

    `handle_tokens` is what the decode job's KV handle named; without it, what was loaded (or,
    when decode recomputed, the whole prompt) stands for it."""
    ex, kv, timings = _ex(event.request_id), event.kv, event.timings
    if role == "decode":
        QUEUE_TIME.labels("decode", priority).observe(timings.decode_queue_ms / 1000, ex)
        named = handle_tokens if handle_tokens is not None else (
            event.usage.prompt_tokens if kv.recomputed else kv.loaded_tokens)
        KV_QUERY_TOKENS.labels("decode").inc(named)
        KV_HIT_TOKENS.labels("decode").inc(kv.loaded_tokens)
        if kv.recomputed:
            KV_RECOMPUTES.inc()
        gpu_s = event.cost.decode_gpu_s
    else:
        QUEUE_TIME.labels("prefill", priority).observe(timings.queue_ms / 1000, ex)
        PREFILL_TIME.labels(priority).observe(timings.prefill_ms / 1000, ex)
        _kv_transfer("write", kv.bytes_written, kv.write_ms, ex)
        KV_QUERY_TOKENS.labels("prefill").inc(event.usage.prompt_tokens)
        KV_HIT_TOKENS.labels("prefill").inc(event.usage.cached_prompt_tokens)
        PROMPT_TOKENS.labels(role).inc(event.usage.prompt_tokens)
        gpu_s = event.cost.prefill_gpu_s + event.cost.decode_gpu_s
    _kv_transfer("read", kv.bytes_read, kv.read_ms, ex)
    GENERATION_TOKENS.labels(role).inc(event.usage.completion_tokens)
    total_s = event.cost.prefill_gpu_s + event.cost.decode_gpu_s
    # the request's price covers both stages; a decode worker books its own share of it
    _cost(role, gpu_s, event.cost.usd * gpu_s / total_s if total_s > 0 else 0.0)


def _kv_transfer(direction: str, nbytes: int, ms: float, ex: dict[str, str] | None) -> None:
    if nbytes > 0:  # nothing moved: no transfer to time
        KV_TRANSFER_BYTES.labels(direction).inc(nbytes)
        KV_TRANSFER_TIME.labels(direction).observe(ms / 1000, ex)


def _cost(role: str, gpu_s: float, usd: float) -> None:
    GPU_SECONDS.labels(role).inc(max(0.0, gpu_s))
    COST_USD.labels(role).inc(max(0.0, usd))


def observe_job(role: str, outcome: str) -> None:
    JOBS.labels(role, outcome).inc()


def set_worker_budget(role: str, budget_tokens: int, reserved_tokens: int) -> None:
    BUDGET_TOKENS.labels(role).set(budget_tokens)
    RESERVED_TOKENS.labels(role).set(reserved_tokens)


def add_busy_seconds(role: str, seconds: float) -> None:
    BUSY_SECONDS.labels(role).inc(max(0.0, seconds))


def observe_engine_step(role: str, kv_cache_usage: float, drafts: int = 0, draft_tokens: int = 0,
                        accepted_tokens: int = 0) -> None:
    """One step of vLLM's scheduler (inference/vllm_stats.py)."""
    KV_CACHE_USAGE.labels(role).set(kv_cache_usage)
    if drafts:
        SPEC_DRAFTS.labels(role).inc(drafts)
        SPEC_DRAFT_TOKENS.labels(role).inc(draft_tokens)
        SPEC_ACCEPTED_TOKENS.labels(role).inc(accepted_tokens)


def count_dead_letter(kind: str) -> None:
    DEAD_LETTERS.labels(kind).inc()


# ---------------------------------------------------------------------------- exposition

def exposition(accept: str) -> tuple[bytes, str]:
    """The registry in the format the scraper's Accept header asks for: OpenMetrics (with
    exemplars) for `application/openmetrics-text`, else the classic text format."""
    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type


_servers: dict[int, object] = {}


def serve_metrics(host: str, port: int) -> int:
    """Serve /metrics from a thread of this worker process (0: a free port); returns the port.
    prometheus_client's server negotiates the format as `exposition` does."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = int(server.server_port)
    _servers[bound] = server
    return bound


def stop_serving(port: int) -> None:
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
