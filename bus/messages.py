"""Every message that crosses the bus, as versioned msgspec Structs (wire format: JSON).

These are immutable wire records, kept apart from the workers' mutable state. Each carries a
`type` tag so one decoder can dispatch on it, and a schema version `v` (absent: 1, in the messages
that leave their defaults off the wire): a reader rejects a version it does not know instead of
misreading it.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from msgspec import Meta, Struct

from bus.priorities import Priority
from bus.roles import Role

SCHEMA_VERSION = 1

ChatRole = Literal["system", "user", "assistant", "tool"]
Id = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
# Bounds of what a publisher controls: a value beyond them is a malformed message, refused once,
# not something a worker (or vLLM) fails on repeatedly.
Tenant = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # a subject token (bus/subjects.py)
Seconds = Annotated[float, Meta(ge=0.0, le=1e11)]  # unix seconds
Attempt = Annotated[int, Meta(ge=0, le=1000)]
MAX_PROMPT_TOKENS = 1 << 20


class Message(Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", kw_only=True):
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version {self.v} (this build speaks {SCHEMA_VERSION})")


class FunctionCall(Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=256)]
    arguments: Annotated[str, Meta(max_length=1024 * 1024)]  # JSON text, as the model wrote it


class ToolCall(Struct, frozen=True, forbid_unknown_fields=True):
    """A call an assistant's earlier turn made, kept in the history for the chat template."""
    id: Annotated[str, Meta(max_length=256)]
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    role: ChatRole
    content: Annotated[str, Meta(max_length=8 * 1024 * 1024)]
    # An assistant turn's tool calls, and which call a tool message answers: both go to the
    # model's chat template as they are (a template without tool support ignores them).
    tool_calls: Annotated[tuple[ToolCall, ...], Meta(max_length=128)] = ()
    tool_call_id: Annotated[str, Meta(max_length=256)] | None = None

    def as_template_input(self) -> dict[str, object]:
        """The message as chat templates read it (OpenAI's shape): by a worker's engine and by an
        edge's tokenizer alike."""
        out: dict[str, object] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": c.type,
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


MAX_LOGPROBS = 20  # as OpenAI's top_logprobs (vLLM's default max_logprobs is 20 too)


class SamplingSpec(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """vLLM's SamplingParams as a client may set them, each within the range vLLM accepts (an
    out-of-range value is refused at the door, not by the engine on every redelivery)."""
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_PROMPT_TOKENS)]
    # These seven, None when the client left them unset: the engine's model defaults (as vLLM
    # takes them from the model's generation config), else vLLM's neutral value (MODEL_DEFAULTED).
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None  # neutral 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None  # neutral 1.0
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=8)] = []
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None  # what vLLM takes
    top_k: Annotated[int, Meta(ge=-1, le=1 << 20)] | None = None  # 0 or -1: off; neutral 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None  # neutral 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None  # neutral 1.0
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None  # neutral 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None  # neutral 0.0
    ignore_eos: bool = False  # go on to max_tokens past the end-of-sequence token (benchmarks)
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 0
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] = []
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # token id -> bias added to its logit (OpenAI's range and, as OpenAI, at most 300 of them)
    logit_bias: Annotated[dict[TokenId, Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=300)] = {}
    # The log probability of each chosen token, with this many most likely alternatives; None: none.
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    # Token events carry the prompt's token count (TokenEvent.prompt_tokens), for a client that
    # wants the usage on every chunk (the OpenAI API's stream_options.continuous_usage_stats).
    count_prompt: bool = False


# vLLM's neutral value of each sampling field a model's generation config may set a default for
# (vLLM's _DEFAULT_SAMPLING_PARAMS): what an unset field (None) is without such a default.
MODEL_DEFAULTED: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                     "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


class Continuation(Struct, frozen=True, forbid_unknown_fields=True):
    """What a request's answer already holds when another region takes it over (its region died
    or was cut off mid-answer): the tokens the client was sent, to compute as part of the prompt,
    and where the events go on. With temperature 0 the continued text equals an uninterrupted run."""
    token_ids: Annotated[list[TokenId], Meta(max_length=MAX_PROMPT_TOKENS)]
    next_seq: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)]  # the seq of the next event


# ChatRequest and TokenEvent leave their defaults off the wire: a reader of an earlier build
# (forbid_unknown_fields) still reads what carries none of the fields added since (prompt_format,
# logprobs, count_prompt, prompt_tokens), while a rolling update runs both builds side by side.
class ChatRequest(Message, tag="chat_request", omit_defaults=True):
    """Edge (or any client publishing directly) -> prefill pool."""
    request_id: Id
    region: Id
    priority: Priority
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=4096)]
    sampling: SamplingSpec
    reply_to: Annotated[str, Meta(max_length=256)]  # subject the token events go to
    conversation_id: Id | None = None
    created_at: Seconds = 0.0  # unix seconds, set by the publisher
    deadline: Seconds = 0.0  # unix seconds; 0 means none
    # The tenant of the client that asked; the request's subject names it too, and a worker
    # refuses a request whose subject says otherwise (a client login may publish only under its
    # own tenant: bus/permissions.py). Another edge checks it before letting a client resume the
    # request. None only in messages older than that rule: a worker refuses them.
    tenant: Tenant | None = None
    # Why the edge chose this region (edge/routing.py): home, requested, sticky, overflow or
    # failover; "" when published straight to the bus.
    route: Annotated[str, Meta(max_length=16)] = ""
    # 0, then one more each time an edge takes the request over in another region; every event
    # carries it, and edges drop events of an attempt they superseded.
    attempt: Attempt = 0
    continuation: Continuation | None = None  # set on attempts after the first
    # How the prompt is made of the messages: "chat", the model's chat template, ready for the
    # assistant's turn; "text", the completions API's prompt: the one message's text as it is.
    prompt_format: Literal["chat", "text"] = "chat"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_format == "text" and len(self.messages) != 1:
            raise ValueError(f"a text prompt is one message, not {len(self.messages)}")


class KvHandle(Struct, frozen=True, forbid_unknown_fields=True):
    """What decode needs to find and validate the prompt's KV cache in Redis."""
    model_id: str
    layout: str  # fingerprint of dtype, heads, head size, block size and layers
    block_size: Annotated[int, Meta(ge=1, le=4096)]
    # one Redis key per full block of the prompt, in order
    keys: Annotated[list[str], Meta(max_length=MAX_PROMPT_TOKENS)]
    num_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)]  # prompt tokens the keys cover
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
    reply_to: Annotated[str, Meta(max_length=256)]
    prompt_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_PROMPT_TOKENS)]
    # The token prefill computed (and sent as the first event). None: no prefill pass ran (a
    # short prompt, EngineConfig.decode_prefill_max_tokens); decode computes the prompt in its
    # own batch and sends the first token itself, at first_seq.
    first_token_id: TokenId | None
    sampling: SamplingSpec
    prefill: PrefillStats
    kv: KvHandle | None = None
    conversation_id: Id | None = None
    created_at: Seconds = 0.0
    deadline: Seconds = 0.0
    # The request's tenant: decode validates the KV handle against this tenant's KV namespace,
    # so a handle naming another tenant's blocks is never loaded (it recomputes instead).
    tenant: Tenant | None = None
    attempt: Attempt = 0  # the request's (ChatRequest.attempt)
    first_seq: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 1  # the seq of decode's first event
    # Leading tokens of the answer inside prompt_token_ids (a continued request's), counted as
    # completion, not prompt, in the usage.
    answered_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 0


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

    @property
    def queue_wait_s(self) -> float:
        """The wait admission estimates (edge/queues.py): the longer of the waits for a prefill
        and, after the first token, for a decode slot."""
        return max(self.queue_ms, self.decode_queue_ms) / 1000


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


class TopLogprob(Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    token: str  # the token's text as the detokenizer gives it alone
    logprob: float  # >= -9999 (vLLM's floor for -inf, which JSON cannot carry)


class TokenLogprob(Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """A chosen token's log probability and the most likely alternatives at its place."""
    token: str
    logprob: float
    top: list[TopLogprob] = []


class TokenEvent(Message, tag="token", omit_defaults=True):
    request_id: Id
    seq: int
    text: str
    token_ids: list[TokenId]
    attempt: int = 0  # the request's attempt that sent it (ChatRequest.attempt)
    # One per token id, when the request asked for logprobs (SamplingSpec.logprobs).
    logprobs: list[TokenLogprob] | None = None
    # The prompt's tokens (the client's: not an answer's tokens a continued attempt computes as
    # prompt), when the request asked (SamplingSpec.count_prompt); 0 otherwise.
    prompt_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 0


class Speculation(Struct, frozen=True, forbid_unknown_fields=True):
    """How speculative decoding went for one answer (vLLM's per-request counts, from the worker
    that finished it; zeros when nothing was drafted). Each verification step yields the accepted
    draft tokens plus one of the model's own."""
    steps: int = 0  # verification steps: engine steps that checked a draft of this answer
    drafted_tokens: int = 0
    accepted_tokens: int = 0


class FinalEvent(Message, tag="final"):
    request_id: Id
    seq: int
    finish_reason: str
    usage: Usage
    timings: Timings = Timings()
    kv: KvTransfer = KvTransfer()
    cost: Cost = Cost()
    attempt: int = 0
    speculation: Speculation = Speculation()
    # The worker that ended the answer (its job's room is free again: edges count it at once,
    # before that worker's next heartbeat says so; edge/queues.py). "" from an edge's own end.
    worker_id: str = ""
    worker_role: Role | None = None


class ErrorEvent(Message, tag="error"):
    request_id: Id
    seq: int
    code: str
    message: str
    retryable: bool = False
    attempt: int = 0
    worker_id: str = ""  # as in FinalEvent
    worker_role: Role | None = None


Event = Union[TokenEvent, FinalEvent, ErrorEvent]


class Cancel(Message, tag="cancel"):
    request_id: Id
    reason: Annotated[str, Meta(max_length=256)]
    # Only attempts below this one (a superseded attempt, while the request goes on as this one,
    # perhaps in the same region); None: every attempt.
    below_attempt: Annotated[int, Meta(ge=1, le=1000)] | None = None


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
    # What its queue really does lately (inference/queue_meter.py), from which edges
    # estimate a new request's wait (edge/queues.py): the jobs it would pull now (-1: not
    # reported, an older worker), the jobs per second it gets through while work waits for it
    # (0: none ended yet), and of that, what work of each priority gets while it waits (less the
    # jobs above it taken meanwhile; absent: an older worker, all of it), and the mean queue wait
    # (publish -> taken) of the jobs it took lately.
    room_jobs: int = -1
    drain_jobs_s: float = 0.0
    drain_by_priority_s: dict[Priority, float] = {}
    queue_wait_s: dict[Priority, float] = {}
    # "draining": it stopped pulling (SIGTERM) and finishes what it holds; "failed": its engine
    # died or its loop stalled, it handed its jobs back and exits. An edge counts a worker that
    # is not "serving" as gone at once, without waiting for its beats to stop. `reason` says why.
    state: Literal["serving", "draining", "failed"] = "serving"
    reason: Annotated[str, Meta(max_length=512)] = ""
    # The jobs it holds now, as their JetStream ack subjects (`$JS.ACK.<stream>...`, the lease of
    # each): the peer that watches it (inference/peer_watch.py) naks them the moment it finds
    # this worker dead, so they are redelivered at once rather than when their leases lapse.
    leases: Annotated[list[Annotated[str, Meta(max_length=256)]], Meta(max_length=1024)] = []


WorkerName = Annotated[str, Meta(min_length=1, max_length=256)]


class LivenessProbe(Message, tag="liveness_probe"):
    """A worker asking the peer it watches whether it still runs (inference/peer_watch.py): sent
    as a request, so NATS answers "no responders" once the peer's connection is gone."""
    sent_at: float  # the prober's monotonic clock, handed back in the answer
    prober: WorkerName  # whose liveness address the answer goes to


class LivenessAnswer(Message, tag="liveness_answer"):
    """A probe answered from the peer's event loop: the loop that renews its jobs' leases ran
    after the probe was sent (a stalled loop answers nothing)."""
    sent_at: float  # the probe's
    worker: WorkerName  # who answers


class Echo(Struct, frozen=True, forbid_unknown_fields=True):
    """A region beat heard, handed back: its sender subtracts `held_s` from the time since it sent
    it, and has the round trip between the regions without comparing clocks."""
    sent_at: float  # the heard beat's own sent_at (its sender's clock)
    held_s: float  # from hearing it to sending this beat (the echoing edge's clock)


class RegionBeat(Message, tag="region_beat"):
    """A region's state, from each edge that sees its workers, several times a second; every edge
    of every region hears it and routes by it (edge/regions.py)."""
    region: Id
    edge_id: Id  # the edge that sent it
    sent_at: float
    domain: str = ""  # the region's JetStream domain ("" when none): where its capture is mirrored from
    model_ids: Annotated[list[str], Meta(max_length=64)] = []
    workers: dict[Role, int] = {}  # live workers by role
    free_slots: int = 0
    # the estimated queue wait of a new request: the longer of its waits for a prefill (its
    # first token) and then for a decode slot (edge/queues.py)
    queue_wait_s: dict[Priority, float] = {}
    prefill_s: float = 0.0  # recent time a prefill took there (0: none seen yet)
    draining: bool = False  # takes no new requests; its running ones finish
    # sending edge id -> the last beat heard from it
    echoes: Annotated[dict[str, Echo], Meta(max_length=1024)] = {}


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
                   RegionBeat, DeadLetter]


class ReplyRoute(Struct):
    """The few fields needed to answer a message that failed validation, read leniently."""
    request_id: str | None = None
    reply_to: str | None = None
