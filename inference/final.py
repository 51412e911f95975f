"""The final event of a request, built in one place for every pool.

An answer ends with one FinalEvent, sent by the worker that finished it: a prefill worker (the
first token ended the answer), a decode worker, or an aggregated worker that did both. Each
knows what its stages measured; `final_event` turns that into the event's usage, timings, KV
transfer and cost, so an event means the same whichever pool sent it. The prompt count that token
events carry when asked (`counted_prompt`) is the same number as the final event's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bus.messages import Cost, FinalEvent, KvTransfer, PrefillStats, SamplingSpec, Speculation, Timings, Usage
from kv_store.records import TransferStats


def counted_prompt(sampling: SamplingSpec, prompt_tokens: int) -> int:
    """A token event's prompt count (TokenEvent.prompt_tokens): the client's prompt tokens when
    the request asked for them on every event, else 0 (left off the wire)."""
    return prompt_tokens if sampling.count_prompt else 0


@dataclass(frozen=True)
class PromptStage:
    """What computing the prompt measured."""
    tokens: int
    cached_tokens: int  # prompt tokens whose KV the engine found (its cache or Redis), not computed
    queue_ms: float  # from publish to a worker taking the request
    prefill_ms: float
    written: TransferStats  # the prompt's KV saved to Redis

    @classmethod
    def of(cls, tokens: int, stats: PrefillStats) -> PromptStage:
        """The stage as a prefill worker measured it (and sent it on in the decode job)."""
        return cls(tokens=tokens, cached_tokens=stats.cached_tokens, queue_ms=stats.queue_ms,
                   prefill_ms=stats.prefill_ms,
                   written=TransferStats(bytes=stats.kv_bytes_written, ms=stats.kv_write_ms))


@dataclass(frozen=True)
class DecodeStage:
    """What generating the tokens after the first one measured."""
    decode_ms: float
    loaded_tokens: int  # prompt tokens whose KV was loaded from Redis instead of computed
    read: TransferStats = field(default_factory=TransferStats)  # the prompt's KV loaded from Redis
    queue_ms: float = 0.0  # waiting for a decode worker (none when the prefilling worker went on)
    recomputed: bool = False  # decode could not use the prompt's KV and computed the prompt itself
    reason: str = ""  # why not all of it was loaded (the connector's report)
    speculation: Speculation = field(default_factory=Speculation)  # the engine's drafts for it


def final_event(request_id: str, seq: int, finish_reason: str, completion_tokens: int,
                prompt: PromptStage, cost: Cost, decode: DecodeStage | None = None) -> FinalEvent:
    """The request's last event. Without a decode stage the first token was the whole answer."""
    decode = decode or DecodeStage(decode_ms=0.0, loaded_tokens=0)
    return FinalEvent(
        request_id=request_id, seq=seq, finish_reason=finish_reason,
        # A decode that recomputed the prompt used none of what the prefill found cached.
        usage=Usage(prompt_tokens=prompt.tokens,
                    cached_prompt_tokens=0 if decode.recomputed else prompt.cached_tokens,
                    completion_tokens=completion_tokens),
        timings=Timings(queue_ms=prompt.queue_ms, prefill_ms=prompt.prefill_ms,
                        decode_queue_ms=decode.queue_ms, decode_ms=decode.decode_ms),
        kv=KvTransfer(bytes_written=prompt.written.bytes, write_ms=prompt.written.ms,
                      bytes_read=decode.read.bytes, read_ms=decode.read.ms, loaded_tokens=decode.loaded_tokens,
                      recomputed=decode.recomputed, reason=decode.reason if decode.recomputed else ""),
        cost=cost, speculation=decode.speculation)
