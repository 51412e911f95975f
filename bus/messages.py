"""Every message that crosses the bus, as versioned msgspec Structs (wire format: JSON).

These are immutable wire records, kept apart from the workers' mutable state. Each carries a
`type` tag so one decoder can dispatch on it, and a schema version `v`: a reader rejects a
version it does not know instead of misreading it.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from msgspec import Meta, Struct

from bus.priorities import Priority
from bus.roles import Role

SCHEMA_VERSION = 1

ChatRole = Literal["system", "user", "assistant"]
Id = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
TokenId = Annotated[int, Meta(ge=0)]


class Message(Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", kw_only=True):
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version {self.v} (this build speaks {SCHEMA_VERSION})")


class ChatMessage(Struct, frozen=True, forbid_unknown_fields=True):
    role: ChatRole
    content: str


class SamplingSpec(Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: Annotated[int, Meta(ge=1)]
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=8)] = []
    seed: int | None = None


class ChatRequest(Message, tag="chat_request"):
    """Edge (or any client publishing directly) -> prefill pool."""
    request_id: Id
    region: Id
    priority: Priority
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    sampling: SamplingSpec
    reply_to: str  # subject the token events go to
    conversation_id: Id | None = None
    created_at: float = 0.0  # unix seconds, set by the publisher
    deadline: float = 0.0  # unix seconds; 0 means none
    # The edge's tenant of the client that asked: another edge checks it before letting a
    # client resume the request (edge failover). None when published straight to the bus.
    tenant: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None


class KvHandle(Struct, frozen=True, forbid_unknown_fields=True):
    """What decode needs to find and validate the prompt's KV cache in Redis."""
    model_id: str
    layout: str  # fingerprint of dtype, heads, head size, block size and layers
    block_size: int
    keys: list[str]  # one Redis key per full block of the prompt, in order
    num_tokens: int  # prompt tokens the keys cover
    content_hash: str  # chained hash of model, layout and those tokens


class PrefillStats(Struct, frozen=True, forbid_unknown_fields=True):
    worker_id: str
    queue_ms: float  # from publish to the prefill worker taking the request
    prefill_ms: float
    cached_tokens: int  # prompt tokens whose KV prefill found in the cache
    done_at: float  # unix seconds when the decode job was published
    kv_bytes_written: int = 0
    kv_write_ms: float = 0.0
    gpu_s: float = 0.0  # accelerator-seconds attributed to this prompt (inference/cost_meter.py)
    usd: float = 0.0  # ...priced at the prefill pool's rate


class DecodeJob(Message, tag="decode_job"):
    """Prefill pool -> decode pool."""
    request_id: Id
    region: Id
    priority: Priority
    reply_to: str
    prompt_token_ids: list[TokenId]
    first_token_id: TokenId
    sampling: SamplingSpec
    prefill: PrefillStats
    kv: KvHandle | None = None
    conversation_id: Id | None = None
    created_at: float = 0.0
    deadline: float = 0.0
    # The request's tenant: decode validates the KV handle against this tenant's KV namespace,
    # so a handle naming another tenant's blocks is never loaded (it recomputes instead).
    tenant: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None


class Usage(Struct, frozen=True, forbid_unknown_fields=True):
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the cache, not computed
    completion_tokens: int


class Timings(Struct, frozen=True, forbid_unknown_fields=True):
    """Worker-side milliseconds, so a client can see where the time went."""
    queue_ms: float = 0.0  # waiting for a prefill worker
    prefill_ms: float = 0.0
    decode_queue_ms: float = 0.0  # waiting for a decode worker
    decode_ms: float = 0.0


class KvTransfer(Struct, frozen=True, forbid_unknown_fields=True):
    """The prompt's KV on its way from prefill to decode through Redis."""
    bytes_written: int = 0
    write_ms: float = 0.0
    bytes_read: int = 0
    read_ms: float = 0.0
    loaded_tokens: int = 0  # prompt tokens decode loaded instead of recomputing
    recomputed: bool = False  # decode could not use the handle and computed the prompt itself
    reason: str = ""  # why, when recomputed


class Cost(Struct, frozen=True, forbid_unknown_fields=True):
    """What a request cost: its share of the accelerators' time, priced (inference/cost_meter.py).
    A step of a batch is shared by the sequences in it, so a request pays for its part only."""
    prefill_gpu_s: float = 0.0
    decode_gpu_s: float = 0.0
    usd: float = 0.0  # (prefill_gpu_s + decode_gpu_s) x gpus per worker x price per GPU-hour / 3600


class TokenEvent(Message, tag="token"):
    request_id: Id
    seq: int
    text: str
    token_ids: list[TokenId]


class FinalEvent(Message, tag="final"):
    request_id: Id
    seq: int
    finish_reason: str
    usage: Usage
    timings: Timings = Timings()
    kv: KvTransfer = KvTransfer()
    cost: Cost = Cost()


class ErrorEvent(Message, tag="error"):
    request_id: Id
    seq: int
    code: str
    message: str
    retryable: bool = False


Event = Union[TokenEvent, FinalEvent, ErrorEvent]


class Cancel(Message, tag="cancel"):
    request_id: Id
    reason: str


class Heartbeat(Message, tag="heartbeat"):
    worker_id: str
    role: Role
    region: str
    model_id: str
    slots: int
    active: int = 0
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    started_at: float = 0.0
    sent_at: float = 0.0
    # The worker's token budget (inference/budget.py): what it may hold at once, what its
    # running jobs hold now, and the tokens per second it gets through while busy (measured).
    # Edges turn these and the queues' depth into an estimated wait (edge/admission.py).
    budget_tokens: int = 0
    reserved_tokens: int = 0
    rate_tokens_s: float = 0.0


class DeadLetter(Message, tag="dead_letter"):
    subject: str
    reason: str
    payload: str
    encoding: Literal["utf-8", "base64"] = "utf-8"
    worker_id: str = ""
    deliveries: int = 1
    failed_at: float = 0.0


# Any message of the bus, dispatched on its `type` tag; an unknown tag is an error.
AnyMessage = Union[ChatRequest, DecodeJob, TokenEvent, FinalEvent, ErrorEvent, Cancel, Heartbeat,
                   DeadLetter]


class ReplyRoute(Struct):
    """The few fields needed to answer a message that failed validation, read leniently."""
    request_id: str | None = None
    reply_to: str | None = None
