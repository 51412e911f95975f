"""`grokstack publish`: submit jobs straight onto the bus, one from arguments or a JSON file, or
a JSONL batch with a progress bar and a JSONL of answers. As an operator (the `ops` login, jobs of
tenant `public`), or with `--client TENANT:CLIENT_ID` as that back-end service's client login,
whose jobs are its tenant's (bus/permissions.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, TextIO

import msgspec
from msgspec import Meta

from bus.client import JobClient, JobRejected, JobResult
from bus.credentials import BusAuth
from bus.messages import ChatMessage, ErrorEvent, FinalEvent, TokenEvent
from bus.priorities import PRIORITIES, Priority
from services.settings import Settings


class JobSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One job as written in `--json` files and `--file` lines."""
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    prompt: str | None = None  # shorthand for one user message
    system: str | None = None
    region: str | None = None
    priority: Priority = "standard"
    max_tokens: int = 256
    temperature: float | None = None  # None: the model's default (SamplingSpec)
    top_p: float | None = None
    stop: list[str] = []
    seed: int | None = None
    conversation_id: str | None = None
    idempotency_key: str | None = None

    def chat(self) -> list[ChatMessage]:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages and prompt")
        system = [ChatMessage(role="system", content=self.system)] if self.system else []
        return system + (self.messages or [ChatMessage(role="user", content=self.prompt or "")])


def add_publish_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the user message (or use --json / --file)")
    p.add_argument("--system", help="a system message before the prompt")
    p.add_argument("--json", type=Path, help="one job as a JSON object (fields as in --file)")
    p.add_argument("--file", type=Path, help="a JSONL batch: one job object per line")
    p.add_argument("--out", type=Path, help="with --file: where the answers go (JSONL; default "
                                            "<file>.results.jsonl)")
    p.add_argument("--concurrency", type=int, default=8, help="with --file: jobs in flight at once")
    p.add_argument("--priority", choices=PRIORITIES, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--conversation-id", default=None)
    p.add_argument("--idempotency-key", default=None,
                   help="the job's id: publishing it again runs the job once, and every caller gets the result")
    p.add_argument("--no-wait", action="store_true", help="print the job id and leave")
    p.add_argument("--attach", metavar="REQUEST_ID", help="follow a job published earlier, from its first token")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a job's answer")
    p.add_argument("--client", default=None, metavar="TENANT:CLIENT_ID",
                   help="log in with this client login of the credentials file (`grokstack nats-auth "
                        "--client`) instead of ops: the jobs are that tenant's")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    if args.json:
        spec = msgspec.json.decode(args.json.read_bytes(), type=JobSpec)
    elif args.prompt is not None:
        spec = JobSpec(prompt=args.prompt)
    else:
        raise ValueError("nothing to publish: give a prompt, --json FILE or --file FILE")
    flags = {"system": args.system, "priority": args.priority, "max_tokens": args.max_tokens,
             "temperature": args.temperature, "top_p": args.top_p, "stop": args.stop,
             "seed": args.seed, "conversation_id": args.conversation_id,
             "idempotency_key": args.idempotency_key}
    return msgspec.structs.replace(spec, **{k: v for k, v in flags.items() if v is not None})


def request_for(client: JobClient, spec: JobSpec, timeout_s: float):
    return client.request(spec.chat(), max_tokens=spec.max_tokens, temperature=spec.temperature,
                          top_p=spec.top_p, stop=spec.stop, seed=spec.seed, priority=spec.priority,
                          region=spec.region, conversation_id=spec.conversation_id,
                          idempotency_key=spec.idempotency_key, timeout_s=timeout_s)


async def run_publish(settings: Settings, args: argparse.Namespace) -> int:
    try:
        async with await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix,
                                           settings.bus.region, auth=_login(settings, args.client)) as client:
            if args.file:
                return await publish_batch(client, args.file, args.out, args.concurrency, args.timeout)
            if args.attach:
                job = await client.attach(args.attach, args.timeout)
            else:
                job = await client.submit(request_for(client, spec_from_args(args), args.timeout),
                                          args.timeout)
                if args.no_wait:
                    print(job.request_id)
                    return 0
                print(f"job {job.request_id}{' (joined the earlier job with this key)' if job.joined else ''}",
                      file=sys.stderr)
            return await follow(job, sys.stdout)
    except (ValueError, msgspec.DecodeError, JobRejected) as exc:
        print(f"grokstack publish: {exc}", file=sys.stderr)
        return 2


def _login(settings: Settings, client: str | None) -> BusAuth:
    if client is None:
        return BusAuth.of(settings.bus, "ops")
    tenant, sep, client_id = client.partition(":")
    if not sep or not tenant or not client_id:
        raise ValueError(f"--client {client!r}: give TENANT:CLIENT_ID")
    return BusAuth.of(settings.bus, "client", tenant, client_id)


async def follow(job, out: TextIO) -> int:
    """Tokens to `out` as they come; the outcome to stderr; 0 when the job finished."""
    async for event in job:
        if isinstance(event, TokenEvent):
            out.write(event.text)
            out.flush()
        elif isinstance(event, FinalEvent):
            u = event.usage
            print(f"\n[{event.finish_reason}: {u.prompt_tokens} prompt tokens ({u.cached_prompt_tokens} "
                  f"cached), {u.completion_tokens} completion tokens]", file=sys.stderr)
            return 0
        elif isinstance(event, ErrorEvent):
            print(f"\n[error {event.code}: {event.message}]", file=sys.stderr)
    return 1


def result_record(line: int, result: JobResult | None, error: str | None) -> dict:
    if result is None:
        return {"line": line, "request_id": None, "text": None, "finish_reason": None,
                "usage": None, "error": error, "joined": False}
    return {"line": line, "request_id": result.request_id, "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": msgspec.to_builtins(result.usage) if result.usage else None,
            "error": f"{result.error.code}: {result.error.message}" if result.error else None,
            "joined": result.joined}


async def publish_batch(client: JobClient, path: Path, out: Path | None, concurrency: int,
                        timeout_s: float) -> int:
    """Every line of `path` as a job, `concurrency` at a time; answers to `out` in line order."""
    from tqdm import tqdm

    lines = [(n, raw) for n, raw in enumerate(path.read_text().splitlines(), 1) if raw.strip()]
    out = out or path.with_suffix(".results.jsonl")
    records: dict[int, dict] = {}
    gate = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(lines), unit="job", file=sys.stderr, desc=f"publishing {path.name}")

    async def one(n: int, raw: str) -> None:
        async with gate:
            try:
                spec = msgspec.json.decode(raw, type=JobSpec)
                job = await client.submit(request_for(client, spec, timeout_s), timeout_s)
                records[n] = result_record(n, await job.result(), None)
            except (ValueError, msgspec.DecodeError, JobRejected, TimeoutError) as exc:
                records[n] = result_record(n, None, f"line {n}: {exc}")
            bar.update(1)
            bar.set_postfix(failed=sum(1 for r in records.values() if r["error"]))

    await asyncio.gather(*(one(n, raw) for n, raw in lines))
    bar.close()
    with out.open("w") as f:
        for n, _ in lines:
            f.write(json.dumps(records[n]) + "\n")
    failed = sum(1 for r in records.values() if r["error"])
    print(f"{len(lines) - failed} answered, {failed} failed; answers in {out}", file=sys.stderr)
    return 1 if failed else 0
