"""The prefill pool: chat request -> prompt KV in Redis + first token -> decode job."""

from __future__ import annotations

import functools
import time
from typing import Callable

import structlog
from nats.js import JetStreamContext

from bus import tracing
from bus.codec import decode, encode
from bus.messages import ChatMessage, ChatRequest, Cost, DecodeJob, KvHandle, PrefillStats, TokenEvent, TokenLogprob
from bus.subjects import Subjects
from bus.roles import Role, job_cost
from inference import metrics
from inference.config import EngineConfig
from inference.engine import Engine, JobRefused
from inference.final import PromptStage, counted_prompt, final_event
from inference.worker import Emitter, Job
from kv_store.keys import kv_request
from kv_store.records import TransferRecord
from kv_store.transfers import TransferRecords

log = structlog.get_logger("grokstack.prefill")
_TRACER = tracing.tracer("grokstack.prefill")


def check_fits(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_tokens + max_tokens > max_model_len:
        raise JobRefused(
            "prompt_too_long",
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}; together they "
            f"must fit the model's context of {max_model_len} tokens")


Render = Callable[[ChatRequest], list[int]]


def prompt_renderer(engine: Engine, size: int = 256) -> Render:
    """A request's prompt tokens: the engine's chat template over its messages, or its text as it
    is (ChatRequest.prompt_format), remembering the last answers: a job's prompt is needed when
    the worker takes the job (its cost) and again when it is served, and is tokenized once."""
    @functools.lru_cache(maxsize=size)
    def tokens(prompt_format: str, messages: tuple[ChatMessage, ...]) -> list[int]:
        return engine.tokenize(messages[0].content) if prompt_format == "text" else engine.render_chat(messages)

    return lambda req: tokens(req.prompt_format, tuple(req.messages))


def prompt_of(render: Render, req: ChatRequest, max_model_len: int) -> list[int]:
    """The request's prompt tokens, refused when prompt plus max_tokens exceed the context. A
    continued request's answer so far is part of it: the engine goes on after it."""
    prompt = render(req)
    if req.continuation is not None:
        prompt = [*prompt, *req.continuation.token_ids]
    check_fits(len(prompt), req.sampling.max_tokens, max_model_len)
    return prompt


def answered(req: ChatRequest) -> int:
    """Tokens of the answer a continued request already holds."""
    return len(req.continuation.token_ids) if req.continuation is not None else 0


def first_seq_of(req: ChatRequest) -> int:
    return req.continuation.next_seq if req.continuation is not None else 0


def queue_ms(job: Job[ChatRequest]) -> float:
    """From publish to this worker taking the request."""
    req = job.body
    return max(0.0, (job.received_at - req.created_at) * 1000) if req.created_at else 0.0


class PrefillService:
    kind = "req"
    role = Role.PREFILL
    first_seq = 0

    def __init__(self, engine: Engine, js: JetStreamContext, subjects: Subjects,
                 transfers: TransferRecords | None, worker_id: str = "",
                 config: EngineConfig | None = None) -> None:
        self.engine = engine
        self.render = prompt_renderer(engine)
        self.js = js
        self.subjects = subjects
        self.transfers = transfers
        self.worker_id = worker_id
        self.in_decode_up_to = (config or EngineConfig()).prompts_in_decode_up_to

    def parse(self, data: bytes) -> ChatRequest:
        return decode(data, ChatRequest)

    def starts_at(self, req: ChatRequest) -> int:
        return first_seq_of(req)

    def queued_at(self, req: ChatRequest) -> float:
        return req.created_at

    def cost(self, req: ChatRequest) -> int:
        # The whole prompt: which of its blocks are cached is known only once vLLM looked.
        return job_cost(self.role, len(self.render(req)) + answered(req), req.sampling.max_tokens)

    async def serve(self, job: Job[ChatRequest], emit: Emitter) -> None:
        req = job.body
        prompt = prompt_of(self.render, req, self.engine.max_model_len)
        if len(prompt) <= self.in_decode_up_to:
            await self._hand_on(job, prompt)
            return
        t0 = time.perf_counter()
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] | None = None
        text, finish, cached, report = "", None, 0, None
        async for chunk in self.engine.generate(req.request_id, prompt, req.sampling, max_tokens=1,
                                                kv=kv_request(req.request_id, req.tenant)):
            token_ids += chunk.token_ids
            text += chunk.text
            if chunk.logprobs is not None:
                logprobs = (logprobs or []) + chunk.logprobs
            finish, cached, report = chunk.finish_reason, chunk.cached_tokens, chunk.kv
        prefill_ms = (time.perf_counter() - t0) * 1000
        await emit.emit(TokenEvent(request_id=req.request_id, seq=emit.next_seq(), text=text,
                                   token_ids=token_ids, logprobs=logprobs,
                                   prompt_tokens=counted_prompt(req.sampling, len(prompt) - answered(req))))
        record = await self.transfers.read(req.request_id) if self.transfers else TransferRecord()
        tracing.measured_span("kv write", _TRACER, time.time() - record.save.ms / 1000, record.save.ms / 1000,
                              {"grokstack.kv.bytes": record.save.bytes, "grokstack.kv.blocks": record.save.blocks})
        gpu_s = job.gpu_seconds()
        stats = PrefillStats(worker_id=self.worker_id, queue_ms=queue_ms(job), prefill_ms=prefill_ms,
                             cached_tokens=cached, done_at=time.time(),
                             kv_bytes_written=record.save.bytes, kv_write_ms=record.save.ms, gpu_s=round(gpu_s, 6),
                             usd=job.clock.usd(gpu_s) if job.clock else 0.0)
        log.info("prefilled", prompt_tokens=len(prompt), cached_tokens=cached,
                 prefill_ms=round(prefill_ms, 1), kv_bytes_written=stats.kv_bytes_written,
                 gpu_s=stats.gpu_s, attempt=req.attempt)
        metrics.observe_prefill(req.priority, req.request_id, stats, len(prompt), usd=stats.usd)
        if finish != "length" or req.sampling.max_tokens == 1 or not token_ids:
            await self._finish(req, emit, len(prompt), stats, finish or "stop")
            return
        await self._publish(req, prompt, token_ids[-1], stats, report.handle if report else None)

    async def _hand_on(self, job: Job[ChatRequest], prompt: list[int]) -> None:
        """A short prompt goes to decode unprefilled: its engine computes it inside the running
        batch (EngineConfig.decode_prefill_max_tokens), so no pass of this engine takes turns with
        decode's for it. Decode sends the first token."""
        req = job.body
        stats = PrefillStats(worker_id=self.worker_id, queue_ms=queue_ms(job), prefill_ms=0.0, cached_tokens=0,
                             done_at=time.time())
        log.info("prompt handed to decode", prompt_tokens=len(prompt), up_to=self.in_decode_up_to,
                 attempt=req.attempt)
        metrics.observe_prompt_in_decode(req.priority, stats)
        await self._publish(req, prompt, None, stats, None)

    async def _publish(self, req: ChatRequest, prompt: list[int], first_token_id: int | None,
                       stats: PrefillStats, kv: KvHandle | None) -> None:
        first_seq = first_seq_of(req) + (first_token_id is not None)
        await self.js.publish(
            self.subjects.decode(req.region, req.priority),
            encode(DecodeJob(
                request_id=req.request_id, region=req.region, priority=req.priority,
                reply_to=req.reply_to, prompt_token_ids=prompt, first_token_id=first_token_id,
                sampling=req.sampling, prefill=stats, kv=kv,
                conversation_id=req.conversation_id, created_at=req.created_at,
                deadline=req.deadline, tenant=req.tenant, attempt=req.attempt,
                first_seq=first_seq, answered_tokens=answered(req))),
            # A redelivered request (this worker died after publishing) is deduplicated here. The
            # trace goes on from this stage's span (inference/worker.py made it current).
            headers=tracing.headers_with_context({"Nats-Msg-Id": f"{req.request_id}.decode.{req.attempt}"}),
            timeout=5)

    async def _finish(self, req: ChatRequest, emit: Emitter, prompt_tokens: int,
                      stats: PrefillStats, finish: str) -> None:
        """The first token already ended the answer: no decode stage."""
        await emit.emit(final_event(req.request_id, emit.next_seq(), finish, completion_tokens=1 + answered(req),
                                    prompt=PromptStage.of(prompt_tokens - answered(req), stats),
                                    cost=Cost(prefill_gpu_s=stats.gpu_s, usd=stats.usd)))
