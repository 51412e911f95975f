"""`grokstack trace REQUEST_ID`: one request's way through edge, prefill, KV store and decode,
rebuilt from captured traffic. Times are the capture stream's (one clock, the server's) plus
the durations the workers reported in their messages."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from bus.capture import Captured
from bus.messages import Cancel, ChatRequest, DeadLetter, DecodeJob, ErrorEvent, FinalEvent, TokenEvent


@dataclass(frozen=True)
class Step:
    at_ms: float  # since the request was stored on the bus
    where: str  # edge, prefill, kv, decode, bus
    what: str


def timeline(items: list[Captured], request_id: str) -> list[Step]:
    request = next((i for i in items if isinstance(i.message, ChatRequest)), None)
    if request is None:
        raise LookupError(f"no captured request {request_id} (wrong id, or older than the capture's retention)")
    t0 = request.time
    steps = [_request_step(request)]
    tokens = [i for i in items if isinstance(i.message, TokenEvent)]
    # a prompt handed to decode unprefilled: decode computed it and sent the first token
    handed = any(isinstance(i.message, DecodeJob) and i.message.first_token_id is None for i in items)
    for item in items:
        at = (item.time - t0) * 1000
        msg = item.message
        if isinstance(msg, DecodeJob):
            steps += _decode_job_steps(msg, at)
        elif isinstance(msg, TokenEvent) and item is tokens[0]:
            steps.append(Step(at, "decode" if msg.seq or handed else "prefill",
                              f"first token on {item.subject}: {msg.text!r} (time to first token {at:.1f} ms)"))
        elif isinstance(msg, FinalEvent):
            steps += _final_steps(msg, at, tokens, t0)
        elif isinstance(msg, ErrorEvent):
            steps.append(Step(at, "bus", f"error #{msg.seq} {msg.code}: {msg.message}"))
        elif isinstance(msg, Cancel):
            steps.append(Step(at, "bus", f"cancel: {msg.reason}"))
        elif isinstance(msg, DeadLetter):
            steps.append(Step(at, "bus", f"dead-lettered from {msg.subject} by {msg.worker_id or '?'} "
                                         f"after {msg.deliveries} deliveries: {msg.reason}"))
    return sorted(steps, key=lambda s: s.at_ms)


def _request_step(item: Captured) -> Step:
    req: ChatRequest = item.message  # type: ignore[assignment]
    sent = f", {(item.time - req.created_at) * 1000:.1f} ms after the client created it" if req.created_at else ""
    client = req.reply_to.split(".")[-2]
    # why the edge chose the region (edge/routing.py); a later attempt continues a request taken over
    route = f", region {req.region} ({req.route})" if req.route else ""
    attempt = f", attempt {req.attempt}" if req.attempt else ""
    return Step(0.0, "edge", f"{client} published to {item.subject} ({len(req.messages)} messages, "
                             f"max_tokens {req.sampling.max_tokens}{route}{attempt}){sent}")


def _decode_job_steps(job: DecodeJob, at: float) -> list[Step]:
    p = job.prefill
    steps = [Step(p.queue_ms, "prefill",
                  f"{p.worker_id} took it after {p.queue_ms:.1f} ms in the queue")]
    if job.first_token_id is None:
        steps.append(Step(at, "prefill", f"handed the prompt to decode unprefilled: {len(job.prompt_token_ids)} "
                                         "tokens, computed in the decode engine's batch"))
    else:
        steps.append(Step(at, "prefill", f"prefill done in {p.prefill_ms:.1f} ms: {len(job.prompt_token_ids)} "
                                         f"prompt tokens, {p.cached_tokens} from cached KV"))
    if job.kv is not None:
        steps.append(Step(at, "kv", f"wrote {p.kv_bytes_written / 1e6:.2f} MB in {p.kv_write_ms:.1f} ms: "
                                    f"{len(job.kv.keys)} blocks, {job.kv.num_tokens} tokens"))
    steps.append(Step(at, "bus", f"decode job published (KV handle: {'yes' if job.kv else 'none'})"))
    return steps


def _final_steps(final: FinalEvent, at: float, tokens: list[Captured], t0: float) -> list[Step]:
    timings, kv, usage = final.timings, final.kv, final.usage
    steps = []
    decode_start = at - timings.decode_ms
    steps.append(Step(max(0.0, decode_start), "decode",
                      f"decode worker took the job after {timings.decode_queue_ms:.1f} ms in the queue"))
    if kv.recomputed:
        steps.append(Step(max(0.0, decode_start), "kv", f"recomputed the prompt: {kv.reason}"))
    elif kv.bytes_read or kv.loaded_tokens:
        steps.append(Step(max(0.0, decode_start), "kv",
                          f"read {kv.bytes_read / 1e6:.2f} MB in {kv.read_ms:.1f} ms "
                          f"({kv.loaded_tokens} prompt tokens loaded)"))
    gaps = [(b.time - a.time) * 1000 for a, b in zip(tokens, tokens[1:], strict=False)]
    itl = f", inter-token p50 {median(gaps):.1f} ms" if gaps else ""
    steps.append(Step(at, "decode", f"final: {final.finish_reason}, {usage.completion_tokens} tokens "
                                    f"({len(tokens)} token events{itl}), decode {timings.decode_ms:.1f} ms"))
    return steps


def render(request_id: str, steps: list[Step]) -> str:
    lines = [f"trace of {request_id}"]
    lines += [f"  +{s.at_ms:9.1f} ms  {s.where:<8} {s.what}" for s in steps]
    return "\n".join(lines)
