"""`grokstack replay`: show captured traffic, republish it into a sandbox, or re-run a captured
request through the live pipeline and diff the answers."""

from __future__ import annotations

import asyncio
import difflib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, AsyncIterator, Iterable

import msgspec

from bus.capture import Captured
from bus.client import JobClient, JobResult
from bus.codec import encode
from bus.messages import (
    Cancel,
    ChatRequest,
    DeadLetter,
    DecodeJob,
    ErrorEvent,
    FinalEvent,
    TokenEvent,
)
from bus.subjects import Subjects


class LiveSubjectsRefused(ValueError):
    pass


# ---------------------------------------------------------------------- showing

def as_json(item: Captured) -> dict:
    return {"source": item.source, "seq": item.seq, "time": item.time, "subject": item.subject,
            "message": msgspec.to_builtins(item.message) if item.message else None,
            "error": item.error or None,
            "raw": None if item.message else item.data.decode("utf-8", "replace")}


def describe(message: object) -> str:
    """One readable line of what a message says."""
    match message:
        case ChatRequest():
            last = message.messages[-1].content.replace("\n", " ")
            temperature = message.sampling.temperature
            return (f"request {message.request_id} {message.priority} max_tokens="
                    f"{message.sampling.max_tokens} t={'model' if temperature is None else temperature} "
                    f"{len(message.messages)} msgs, last: {last[:60]!r}")
        case DecodeJob():
            kv = message.kv
            blocks = f"{len(kv.keys)} KV blocks ({kv.num_tokens} tokens)" if kv else "no KV handle"
            prefill = ("prompt left to decode" if message.first_token_id is None
                       else f"prefill {message.prefill.prefill_ms:.1f} ms")
            return (f"decode job {message.request_id} {len(message.prompt_token_ids)} prompt "
                    f"tokens, {blocks}, {prefill}")
        case TokenEvent():
            return f"token {message.request_id} #{message.seq} {message.text!r}"
        case FinalEvent():
            u = message.usage
            return (f"final {message.request_id} #{message.seq} {message.finish_reason}: "
                    f"{u.prompt_tokens} prompt ({u.cached_prompt_tokens} cached), "
                    f"{u.completion_tokens} completion")
        case ErrorEvent():
            return f"error {message.request_id} #{message.seq} {message.code}: {message.message}"
        case Cancel():
            return f"cancel {message.request_id}: {message.reason}"
        case DeadLetter():
            return f"dead letter from {message.subject}: {message.reason}"
        case _:
            return type(message).__name__


def as_line(item: Captured, start: float) -> str:
    stamp = datetime.fromtimestamp(item.time, timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    what = describe(item.message) if item.message else f"UNDECODABLE ({item.error}) {item.data[:80]!r}"
    where = f"{item.source}#{item.seq}"
    return f"{stamp} +{(item.time - start) * 1000:9.1f} ms  {where:<14} {item.subject:<36} {what}"


def write(items: Iterable[Captured], out: IO[str], jsonl: bool) -> int:
    count, start = 0, None
    for item in items:
        start = item.time if start is None else start
        out.write(json.dumps(as_json(item)) + "\n" if jsonl else as_line(item, start) + "\n")
        count += 1
    return count


# ---------------------------------------------------------------------- republishing

def retargeted(item: Captured, live: Subjects, target: Subjects) -> tuple[str, bytes]:
    """The subject and payload for republishing under another prefix. A request or job also
    gets its reply_to moved, so replayed work never answers onto live event subjects."""
    subject = live.moved_to(item.subject, target)
    message = item.message
    if isinstance(message, (ChatRequest, DecodeJob)):
        message = msgspec.structs.replace(message, reply_to=live.moved_to(message.reply_to, target))
        return subject, encode(message)
    return subject, item.data  # byte for byte, undecodable ones included


async def republish(nc, items: list[Captured], live: Subjects, target: Subjects,
                    speed: float, allow_live: bool = False) -> int:
    """Publish `items` under `target`'s prefix, keeping their original spacing divided by
    `speed` (0: as fast as possible). Onto the live prefix only when `allow_live`."""
    if target.prefix == live.prefix and not allow_live:
        raise LiveSubjectsRefused(f"refusing to replay onto the live prefix {live.prefix!r}; "
                                  "pass --live to do it on purpose")
    if not items:
        return 0
    began, first = time.monotonic(), items[0].time
    for item in items:
        if speed > 0:
            due = began + (item.time - first) / speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        subject, payload = retargeted(item, live, target)
        await nc.publish(subject, payload)
    await nc.flush()
    return len(items)


# ---------------------------------------------------------------------- re-running

@dataclass
class Rerun:
    request_id: str  # the captured request
    rerun_id: str
    captured_tokens: list[str]
    new_tokens: list[str]
    captured_finish: str | None
    new_finish: str | None
    new_error: str | None

    @property
    def identical(self) -> bool:
        return (self.captured_tokens == self.new_tokens and self.captured_finish == self.new_finish
                and self.new_error is None)

    def report(self) -> str:
        head = f"rerun of {self.request_id} as {self.rerun_id}: "
        if self.identical:
            return head + f"identical ({len(self.new_tokens)} tokens, {self.new_finish})"
        lines = [head + "DIFFERENT"]
        if self.new_error:
            lines.append(f"  the rerun failed: {self.new_error}")
        same = 0
        for a, b in zip(self.captured_tokens, self.new_tokens, strict=False):
            if a != b:
                break
            same += 1
        lines.append(f"  first {same} tokens agree; captured {len(self.captured_tokens)} tokens "
                     f"({self.captured_finish}), rerun {len(self.new_tokens)} ({self.new_finish})")
        lines += ["  " + line.rstrip("\n") for line in difflib.unified_diff(
            _lines(self.captured_tokens), _lines(self.new_tokens), "captured", "rerun", n=1)]
        return "\n".join(lines)


def _lines(tokens: list[str]) -> list[str]:
    """Token text split into lines for a readable diff; tokens without a newline stay joined."""
    return "".join(tokens).splitlines(keepends=True) or [""]


def captured_answer(items: list[Captured], request_id: str) -> tuple[list[str], str | None]:
    tokens = sorted((i.message for i in items if isinstance(i.message, TokenEvent)
                     and i.message.request_id == request_id), key=lambda e: e.seq)
    finals = [i.message for i in items if isinstance(i.message, FinalEvent)
              and i.message.request_id == request_id]
    return [t.text for t in tokens], finals[0].finish_reason if finals else None


async def rerun(client: JobClient, items: list[Captured], overrides: dict,
                timeout_s: float = 300.0) -> AsyncIterator[Rerun]:
    """Each captured ChatRequest in `items` again, under a new id, through the pipeline the
    client is connected to; `overrides` changes sampling fields (temperature, max_tokens...)."""
    for item in items:
        request = item.message
        if not isinstance(request, ChatRequest):
            continue
        rerun_id = f"rr-{uuid.uuid4().hex[:16]}"
        sampling = msgspec.structs.replace(request.sampling, **overrides)
        # the whole sampling (vLLM's every field) and the prompt's format, as captured
        fresh = client.new_request(list(request.messages), sampling, request.priority, region=request.region,
                                   conversation_id=request.conversation_id, request_id=rerun_id,
                                   timeout_s=timeout_s, tenant=request.tenant, prompt_format=request.prompt_format)
        result: JobResult = await (await client.submit(fresh, timeout_s)).result()
        tokens, finish = captured_answer(items, request.request_id)
        yield Rerun(request_id=request.request_id, rerun_id=rerun_id, captured_tokens=tokens,
                    new_tokens=[e.text for e in result.events if isinstance(e, TokenEvent)],
                    captured_finish=finish, new_finish=result.finish_reason,
                    new_error=f"{result.error.code}: {result.error.message}" if result.error else None)
