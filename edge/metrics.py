"""The edge's Prometheus metrics: what a client sees. Observed by edge/live.py (latencies and
tokens), the admission code (refusals, queue estimates) and the doors.

Latency histograms carry the request id as an exemplar, so a slow bucket on a dashboard leads
to one request's logs (`request_id` is bound on every log line) and its bus traffic
(`grokstack trace <request id>`). Exemplars only travel in the OpenMetrics format, which
services/telemetry.py serves when the scraper asks for it. The registry is this package's own;
services/telemetry.py serves it with the others.
"""

from __future__ import annotations

from functools import partial

import prometheus_client
from prometheus_client import CollectorRegistry

REGISTRY = CollectorRegistry()
Counter = partial(prometheus_client.Counter, registry=REGISTRY)
Gauge = partial(prometheus_client.Gauge, registry=REGISTRY)
Histogram = partial(prometheus_client.Histogram, registry=REGISTRY)

# Bucket bounds in seconds, spanning what this stack sees on a CPU (slow) and on GPUs (fast).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)

EDGE = ["region", "priority"]

TIME_TO_FIRST_TOKEN = Histogram(
    "grokstack_time_to_first_token_seconds",
    "Edge: from publishing the request (stored in JetStream, in whichever region) to its first token event.",
    EDGE, buckets=TTFT_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "grokstack_inter_token_latency_seconds",
    "Edge: gap between consecutive tokens; a frame of n tokens after a gap g counts n gaps of g/n.",
    EDGE, buckets=ITL_BUCKETS)
E2E_LATENCY = Histogram(
    "grokstack_e2e_request_latency_seconds",
    "Edge: from publishing the request to its last event; outcome is the finish reason or the error code.",
    [*EDGE, "outcome"], buckets=E2E_BUCKETS)
ACTIVE_STREAMS = Gauge(
    "grokstack_active_streams", "Edge: requests in flight on this edge (accepted, not yet finished).")
EDGE_PROMPT_TOKENS = Counter(
    "grokstack_edge_prompt_tokens_total", "Edge: prompt tokens of finished requests (final event usage).", EDGE)
# Token counts, as vLLM's request_prompt_tokens / request_generation_tokens: 1-2-5 steps.
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)
REQUEST_PROMPT_TOKENS = Histogram(
    "grokstack_request_prompt_tokens", "Edge: prompt tokens of each finished request (final event usage).",
    EDGE, buckets=LENGTH_BUCKETS)
REQUEST_GENERATION_TOKENS = Histogram(
    "grokstack_request_generation_tokens", "Edge: answer tokens of each finished request (final event usage).",
    EDGE, buckets=LENGTH_BUCKETS)
REQUESTS = Counter(
    "grokstack_requests_total",
    "Edge: generation requests by door (openai, websocket), the HTTP status they were answered with (a "
    "websocket error: the status of its code) and the error type (its stable code; '' when served).",
    ["api", "status", "error_type"])
CLIENT_DISCONNECTS = Counter(
    "grokstack_client_disconnects_total",
    "Edge: clients that went away while their request was unfinished (it goes on for resume_grace_s).")
EDGE_GENERATION_TOKENS = Counter(
    "grokstack_edge_generation_tokens_total",
    "Edge: completion tokens of finished requests (final event usage).", EDGE)
REQUESTS_REFUSED = Counter(
    "grokstack_requests_refused_total",
    "Edge: requests refused at admission, by reason (overloaded, rate_limited, too_many_requests, unavailable).",
    ["priority", "reason"])
ADMISSION_AUDITS = Counter(
    "grokstack_admission_audits_total",
    "Edge: requests admission would have refused as overloaded but served as an audit "
    "(GROKSTACK_ADMISSION_AUDIT_SHARE), by whether their real queue wait was over the budget "
    "(over_budget: the refusal would have been right) or not; unfinished or failed ones are not counted.",
    ["priority", "verdict"])
QUEUE_DEPTH = Gauge(
    "grokstack_queue_depth", "Edge: jobs waiting in a work queue (kind req or decode), as the edge last read it.",
    ["kind", "region", "priority"])
QUEUE_WAIT_ESTIMATE = Gauge(
    "grokstack_queue_wait_estimate_seconds",
    "Edge: estimated wait of a new request of this priority (admission control's input).", EDGE)
QUEUE_WAIT_MEASURED = Gauge(
    "grokstack_queue_wait_measured_seconds",
    "Edge: the mean queue wait a pool's workers measured for their recent jobs of this priority (kind req or "
    "decode; the longest of its workers'), to hold the estimate against.", ["kind", "region", "priority"])
IGNORED_FIELDS = Counter(
    "grokstack_openai_ignored_fields_total",
    "Edge: OpenAI API body fields no one here knows, ignored (as vLLM does); by name, the first 64 names "
    "seen, then 'other'.", ["field"])

REQUESTS_ROUTED = Counter(
    "grokstack_requests_routed_total",
    "Edge: requests accepted, by the region chosen and why (home, requested, sticky, overflow, failover).",
    ["region", "reason"])
REGION_ALIVE = Gauge(
    "grokstack_region_alive", "Edge: 1 while the region beats and serves every stage, else 0.", ["region"])
REGION_RTT = Gauge(
    "grokstack_region_rtt_seconds", "Edge: measured round trip to the region (0: the edge's own).", ["region"])
TAKEOVERS = Counter(
    "grokstack_takeovers_total",
    "Edge: requests taken over by another region: their region died mid-answer (region_dead), or their "
    "client's edge did and the client resumed here (client_moved).", ["from_region", "to_region", "cause"])
TAKEOVER_DETECTION = Histogram(
    "grokstack_takeover_detection_seconds",
    "Edge: from a dead region's last beat to its request being published elsewhere (region_dead only).",
    ["from_region"], buckets=(0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10))
REGION_TTFT_ESTIMATE = Gauge(
    "grokstack_region_ttft_estimate_seconds",
    "Edge: estimated time to first token in the region: round trip + queue wait + prefill (routing's input).",
    EDGE)


def _ex(request_id: str) -> dict[str, str] | None:
    return {"request_id": request_id} if request_id else None


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
    if prompt_tokens or completion_tokens:  # a finished answer (an error has no usage)
        REQUEST_PROMPT_TOKENS.labels(region, priority).observe(prompt_tokens, _ex(request_id))
        REQUEST_GENERATION_TOKENS.labels(region, priority).observe(completion_tokens, _ex(request_id))


def observe_request(api: str, status: int, error_type: str = "") -> None:
    REQUESTS.labels(api, str(status), error_type).inc()


def observe_client_disconnect() -> None:
    CLIENT_DISCONNECTS.inc()


def stream_started() -> None:
    ACTIVE_STREAMS.inc()


def stream_ended() -> None:
    ACTIVE_STREAMS.dec()


def observe_refused(reason: str, priority: str) -> None:
    REQUESTS_REFUSED.labels(priority, reason).inc()


def observe_admission_audit(priority: str, over_budget: bool) -> None:
    ADMISSION_AUDITS.labels(priority, "over_budget" if over_budget else "within_budget").inc()


def observe_ignored_field(field: str) -> None:
    IGNORED_FIELDS.labels(field).inc()


def set_queue_depth(kind: str, region: str, priority: str, depth: int) -> None:
    QUEUE_DEPTH.labels(kind, region, priority).set(depth)


def set_queue_wait_measured(kind: str, region: str, priority: str, seconds: float | None) -> None:
    """None: no job of it was taken lately, so no wait measured (0 is what an empty queue shows)."""
    QUEUE_WAIT_MEASURED.labels(kind, region, priority).set(0.0 if seconds is None else seconds)


def set_queue_wait(region: str, priority: str, seconds: float) -> None:
    QUEUE_WAIT_ESTIMATE.labels(region, priority).set(seconds)


def observe_takeover(from_region: str, to_region: str, cause: str, detected_s: float) -> None:
    TAKEOVERS.labels(from_region, to_region, cause).inc()
    if cause == "region_dead":
        TAKEOVER_DETECTION.labels(from_region).observe(detected_s)


def observe_routed(region: str, reason: str) -> None:
    REQUESTS_ROUTED.labels(region, reason).inc()


def set_region_state(region: str, alive: bool, rtt_s: float, ttft_s: dict[str, float]) -> None:
    REGION_ALIVE.labels(region).set(1 if alive else 0)
    REGION_RTT.labels(region).set(rtt_s)
    for priority, seconds in ttft_s.items():
        REGION_TTFT_ESTIMATE.labels(region, priority).set(seconds)
