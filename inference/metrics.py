"""The workers' Prometheus metrics: what each stage did. Observed by the prefill, decode and
aggregated services, the worker shell, and vLLM's per-step scheduler stats through
inference/vllm_stats.py. One process may hold several workers (the tests do); their metrics are
told apart by the `role` label. The registry is this package's own; services/telemetry.py serves
it with the others.

Latency histograms carry the request id as an exemplar (see edge/metrics.py).
"""

from __future__ import annotations

from functools import partial

import prometheus_client
from prometheus_client import CollectorRegistry

from bus.messages import FinalEvent, PrefillStats
from bus.roles import ROLES, Role

REGISTRY = CollectorRegistry()
Counter = partial(prometheus_client.Counter, registry=REGISTRY)
Gauge = partial(prometheus_client.Gauge, registry=REGISTRY)
Histogram = partial(prometheus_client.Histogram, registry=REGISTRY)

# Bucket bounds in seconds, spanning what this stack sees on a CPU (slow) and on GPUs (fast).
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
PREFILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

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
    "grokstack_jobs_total", "Worker: jobs ended, by outcome (served, cancelled, refused, failed, dead_lettered, "
    "superseded, handed_over: given back at once as its worker stopped or its engine died).",
    ["role", "outcome"])
PEERS_GONE = Counter(
    "grokstack_peers_found_gone_total", "Worker: peers of its pool it found dead (their connection gone) "
    "while they held jobs, whose jobs it handed on at once (inference/peer_watch.py).", ["role"])
PEER_JOBS_HANDED_ON = Counter(
    "grokstack_peer_jobs_handed_on_total", "Worker: jobs of dead peers it nak'ed for redelivery before their "
    "leases lapsed.", ["role"])

MIGRATIONS = Counter(
    "grokstack_migrations_total", "Worker: jobs it took over mid-answer after the worker serving them died "
    "(redelivered by JetStream), continued after the tokens the client was already sent.", ["role"])

PROMPTS_IN_DECODE = Counter(
    "grokstack_prompts_in_decode_total", "Prefill worker: short prompts handed to decode unprefilled, for its "
    "engine to compute inside its batch (GROKSTACK_DECODE_PREFILL_MAX_TOKENS).", ["priority"])


def _ex(request_id: str) -> dict[str, str] | None:
    return {"request_id": request_id} if request_id else None


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


def observe_migration(role: str) -> None:
    MIGRATIONS.labels(role).inc()


def observe_prompt_in_decode(priority: str, stats: PrefillStats) -> None:
    """A prefill worker handed a short prompt to decode without computing it."""
    QUEUE_TIME.labels("prefill", priority).observe(stats.queue_ms / 1000)
    PROMPTS_IN_DECODE.labels(priority).inc()


def observe_final(role: Role, priority: str, event: FinalEvent, handle_tokens: int | None = None) -> None:
    """A decode or aggregated worker finished a request. A worker counts the stages it serves: a
    decode worker only its own (prefill counted the rest in observe_prefill), an aggregated both.

    `handle_tokens` is what the decode job's KV handle named; without it, what was loaded (or,
    when decode recomputed, the whole prompt) stands for it."""
    ex, kv, timings = _ex(event.request_id), event.kv, event.timings
    if "prefill" not in ROLES[role].stages:
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


def observe_peer_gone(role: str, jobs: int) -> None:
    PEERS_GONE.labels(role).inc()
    PEER_JOBS_HANDED_ON.labels(role).inc(jobs)


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
