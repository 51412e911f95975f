"""Every setting of the stack, and the one module that reads the environment.

Each field of `Settings` has exactly one environment variable, listed in `ENV`; the CLI can
override any field. Components receive the whole `Settings` object and never read
`os.environ` themselves (vLLM's own VLLM_* variables are derived in `inference/profiles.py`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Settings:
    # --- where the shared services are ("" means: `grokstack up` starts embedded ones) ---
    nats_url: str = ""
    redis_url: str = ""
    subject_prefix: str = "gs"
    region: str = "local"
    data_dir: Path = Path(".data")
    # JSON file of NATS logins per role (bus/credentials.py, bus/permissions.py); "" means the
    # one the embedded server writes, <data_dir>/nats/credentials.json, when it exists, else none.
    nats_credentials: str = ""
    # TLS to NATS: a CA to trust (else the system's, for tls:// URLs), and a client certificate
    # and key when the server asks for one (mutual TLS). Redis takes its TLS and its user and
    # password in the URL (rediss://user:password@host:6380/0?ssl_ca_certs=ca.pem).
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""

    # --- model and engine ---
    model: str = ""  # an HF model folder; "" means the bundled model in data_dir
    served_model_name: str = ""  # the model id clients see; "" means the folder name
    engine_profile: str = "auto"  # cpu | gpu | auto (gpu when CUDA is available)
    max_model_len: int = 2048
    block_size: int = 0  # KV block size in tokens; 0 means the profile's default
    kv_cache_gib: int = 1  # CPU profile: KV cache space per engine, whole GiB
    gpu_memory_utilization: float = 0.85  # GPU profile
    spec_method: str = "auto"  # ngram | draft | off | auto (profile default)
    spec_tokens: int = 5
    spec_ngram_min: int = 2
    spec_ngram_max: int = 4
    spec_draft_model: str = ""  # HF folder of the draft model for spec_method=draft
    spec_max_batch: int = 1  # speculate only while at most this many sequences decode
    # A lock file shared by the engines of one machine so they take turns per forward pass
    # instead of fighting over the same cores; `grokstack up` sets it for the CPU profile.
    engine_step_lock: str = ""
    # Added to this process's nice value (a lower CPU priority). On a shared CPU `grokstack up`
    # gives the decode worker +5 so prompt processing goes first, as vLLM's own scheduler
    # prefers prefills within one engine.
    cpu_nice: int = 0

    # --- workers ---
    # How `grokstack up` serves: "disaggregated" runs a prefill and a decode worker, the KV
    # handed over through Redis (the design for separate GPU pools); "aggregated" runs one
    # worker whose engine does both (better when they would share the same cores).
    serving_mode: str = "disaggregated"
    worker_id: str = ""  # "" means host-pid
    prefill_slots: int = 4  # prompts a prefill worker works on at once
    decode_slots: int = 16  # sequences a decode worker batches at once
    # The lease on a job: a worker renews it 6 times per period while it works on the job, and
    # JetStream hands the job to another worker once it lapses. It is how fast a dead worker's
    # requests move on (a SIGKILLed decode worker's answer continues on a spare within about
    # this long), so keep it short; renewals are tiny messages (10 per second per job).
    ack_wait_s: float = 0.6
    max_deliver: int = 5  # deliveries of one job before it is dead-lettered
    heartbeat_s: float = 2.0
    request_ttl_s: float = 600.0  # queued requests older than this are dropped by the server
    drain_timeout_s: float = 20.0  # on SIGTERM, running jobs get this long to finish
    work_stream_mb: int = 1024  # bound of each work-queue stream (requests, decode jobs)
    dead_letter_stream_mb: int = 256
    # Publishing a request whose id (Nats-Msg-Id) was seen within this window stores it once:
    # the idempotency window of direct publishes. At most request_ttl_s.
    dedupe_window_s: float = 600.0

    # Token budgets (inference/budget.py): a worker pulls a job only while it has room for the
    # largest job there can be, so vLLM's continuous batch stays full but never over-full.
    # Prefill counts prompt tokens to compute (cached ones excluded); decode counts KV tokens
    # (prompt + max_tokens) and 0 means the engine's whole KV cache.
    prefill_token_budget: int = 8192
    decode_token_budget: int = 0
    # Lower priorities may hold at most this share of a worker's budget, so interactive work
    # that arrives finds room at once; and they get at least this share of what is served while
    # they have work queued, so they are not starved when there is no spike.
    max_share_standard: float = 0.8
    max_share_batch: float = 0.5
    min_share_standard: float = 0.1
    min_share_batch: float = 0.05

    # --- admission at the edge (edge/admission.py) ---
    # A new request is refused (429 / retryable error with retry-after) when its priority's
    # estimated queue wait exceeds this budget; 0 turns admission control off for it.
    queue_budget_interactive_s: float = 2.0
    queue_budget_standard_s: float = 8.0
    queue_budget_batch_s: float = 20.0
    # Before refusing batch requests, their max_tokens is capped to this once the batch wait
    # passes half its budget (0: no degradation).
    degraded_batch_max_tokens: int = 64
    queue_poll_s: float = 0.5  # how often an edge reads the work queues' depth

    # --- cost ---
    gpu_price_per_hour: float = 3.0  # dollars per accelerator-hour
    gpus_per_worker: float = 1.0  # accelerators each worker's engine occupies

    # --- telemetry ---
    # Workers serve Prometheus metrics on http://<edge_host>:<metrics_port>/metrics (0: a free
    # port, logged); the edge serves them on its API port. `grokstack up` gives each worker one.
    metrics_port: int = 0

    # --- capture of bus traffic for replay and tracing (stream GS_CAPTURE) ---
    capture_max_age_s: float = 24 * 3600.0  # the server drops captured traffic older than this
    capture_max_mb: int = 2048  # ...and the oldest traffic beyond this size

    # --- KV cache in Redis ---
    kv_ttl_s: int = 3600
    kv_key_prefix: str = "gskv"
    redis_maxmemory: str = "2gb"  # embedded server only: bound plus allkeys-lru eviction

    # --- edge node ---
    edge_host: str = "127.0.0.1"
    edge_port: int = 8765  # websocket chat and the chat page
    api_port: int = 8000  # OpenAI-compatible HTTP API (same host)
    # JSON file of tenants and their API keys' SHA-256 hashes (`grokstack apikey`); "" means no
    # authentication: every caller is tenant "public" with every priority.
    api_keys_file: str = ""
    max_frame_bytes: int = 256 * 1024  # a websocket frame or an HTTP request body
    max_messages: int = 256
    max_prompt_chars: int = 64 * 1024
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_inflight_per_connection: int = 8
    max_inflight_per_edge: int = 256  # beyond it new requests get 429 / too_many_requests
    # A request whose client disconnected is kept running this long for it to come back and
    # resume; then it is cancelled through the pipeline.
    resume_grace_s: float = 10.0
    resume_retention_s: float = 120.0  # a finished request's events stay resumable this long
    request_timeout_s: float = 300.0
    send_timeout_s: float = 10.0

    # --- logs ---
    log_level: str = "info"
    log_format: str = "json"  # json | console

    @property
    def model_dir(self) -> Path:
        return Path(self.model) if self.model else self.data_dir / "models" / BUNDLED_MODEL_NAME

    @property
    def nats_credentials_file(self) -> Path | None:
        if self.nats_credentials:
            return Path(self.nats_credentials)
        embedded = self.data_dir / "nats" / "credentials.json"
        return embedded if embedded.exists() else None

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model_dir.name

    @property
    def worker_name(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    def __repr__(self) -> str:
        """Without the passwords the URLs may carry: tracebacks and test reports show settings."""
        fields = ", ".join(f"{f.name}={redact_url(v) if f.name.endswith('_url') else v!r}"
                           for f in dataclasses.fields(self) for v in [getattr(self, f.name)])
        return f"Settings({fields})"

    def replace(self, **changes: Any) -> "Settings":
        """A copy with `changes`; values that are None are ignored (unset CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def redact_url(url: str) -> str:
    """`redis://grokstack:secret@host:6379/0` -> `redis://grokstack:***@host:6379/0`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


# Field -> environment variable. NATS_URL and REDIS_URL keep their conventional names.
ENV: dict[str, str] = {
    f.name: ("NATS_URL" if f.name == "nats_url" else "REDIS_URL" if f.name == "redis_url"
             else f"GROKSTACK_{f.name.upper()}")
    for f in dataclasses.fields(Settings)
}


def _parse(kind: Any, raw: str) -> Any:
    kind = {"int": int, "float": float, "Path": Path, "str": str}.get(kind, kind)
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"cannot read {raw!r} as {kind.__name__}") from exc


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = environ.get(ENV[f.name])
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = _parse(f.type, raw)
        except ValueError as exc:
            raise SystemExit(f"{ENV[f.name]}: {exc}") from None
    return Settings(**values)


def describe() -> list[tuple[str, str, str]]:
    """(variable, field, default) rows for `grokstack settings` and the README."""
    defaults = Settings()
    return [(ENV[f.name], f.name, repr(getattr(defaults, f.name))) for f in dataclasses.fields(Settings)]
