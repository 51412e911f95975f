"""The edge node's settings: where it listens, what it accepts from a client, how long it keeps
requests for them."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from bus.section import Count, Port, Section, Seconds, Share


class EdgeConfig(Section):
    edge_host: str = "127.0.0.1"
    edge_port: Port = 8765  # websocket chat and the chat page
    api_port: Port = 8000  # OpenAI-compatible HTTP API (same host)
    # JSON file of tenants and their API keys' SHA-256 hashes (`grokstack apikey`); "" means no
    # authentication: every caller is tenant "public" with every priority.
    api_keys_file: str = ""
    # Origins (e.g. "https://chat.example.com", comma-separated; "*": any) whose web pages may open
    # the websocket, besides the chat page's own (the request's Host). A handshake without an
    # Origin header (not a browser: our clients, curl) is let in: the check stops a web page a
    # user visits from driving a stack it can reach.
    allowed_origins: str = ""
    # What a client may send (edge/protocol.py checks every frame and body against these).
    max_frame_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024  # a websocket frame or an HTTP body
    max_messages: Count = 256
    max_prompt_chars: Count = 64 * 1024
    max_tokens_limit: Count = 1024
    default_max_tokens: Count = 256
    max_inflight_per_connection: Count = 8
    max_inflight_per_edge: Count = 256  # beyond it new requests get 429 / too_many_requests
    # A request whose client disconnected is kept running this long for it to come back and
    # resume; then it is cancelled through the pipeline.
    resume_grace_s: Seconds = 10.0
    resume_retention_s: Seconds = 120.0  # a finished request's events stay resumable this long
    # Resumes (edge/resume.py) per second and at once: of a client (a websocket connection, an
    # HTTP client's address; behind a proxy, the proxy's), and of a tenant (those with a valid token).
    resume_client_rate: Annotated[float, Field(gt=0)] = 5.0
    resume_client_burst: Count = 10
    resume_tenant_rate: Annotated[float, Field(gt=0)] = 20.0
    resume_tenant_burst: Count = 40
    # The edge's liveness (/healthz) fails when its event loop has not run for this long.
    loop_stall_s: Seconds = 10.0
    request_timeout_s: Seconds = 300.0
    send_timeout_s: Seconds = 10.0
    # Before refusing batch requests (bus/priorities.py budgets), their max_tokens is capped to
    # this once the batch wait passes half its budget (0: no degradation).
    degraded_batch_max_tokens: Annotated[int, Field(ge=0)] = 64
    # This share of the requests admission would refuse as overloaded is served instead, and
    # their real queue wait counted against the budget (grokstack_admission_audits_total): the
    # refusals' precision, measured in production (0: refuse them all).
    admission_audit_share: Share = 0.0
    queue_poll_s: Seconds = 0.5  # how often an edge reads the work queues' depth
    # Regions (edge/regions.py, edge/routing.py). Each edge announces the regions whose workers it
    # sees every region_beat_s; a region not heard from for region_timeout_s is dead.
    region_beat_s: Seconds = 0.25
    region_timeout_s: Seconds = 0.75  # three beats missed
    # A request goes to another region once its home's estimated time to first token passes this
    # share of the priority's queue budget, and comes home again below overflow_back_share.
    overflow_share: Share = 0.5
    overflow_back_share: Share = 0.4
    region_draining: bool = False  # this edge announces its region as draining: no new requests
    sticky_conversations: Count = 100_000  # conversations remembered with the region that served them
