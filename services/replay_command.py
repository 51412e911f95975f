"""The `grokstack replay` and `grokstack trace` commands: arguments in, capture read, one action."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bus import capture
from bus.capture import Captured, Selection
from bus.client import JobClient
from bus.jetstream import connect_as
from bus.subjects import Subjects
from services import replay, trace
from services.settings import Settings

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_time(text: str, now: float | None = None) -> float:
    """`90s`, `15m`, `2h`, `1d` ago; an ISO 8601 time (UTC unless it says otherwise); or unix
    seconds."""
    now = time.time() if now is None else now
    if m := _RELATIVE.match(text):
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: use 15m, 2h, an ISO time or unix seconds") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def parse_seq_range(text: str) -> tuple[int | None, int | None]:
    """`100:200`, `100:` or `:200` (inclusive)."""
    first, sep, last = text.partition(":")
    if not sep:
        raise ValueError(f"--seq {text!r}: use FIRST:LAST, FIRST: or :LAST")
    try:
        return (int(first) if first else None, int(last) if last else None)
    except ValueError:
        raise ValueError(f"--seq {text!r}: sequence numbers are integers") from None


def add_selection_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to select (all given filters apply)")
    g.add_argument("--request", help="one request id")
    g.add_argument("--conversation", help="every request of a conversation id")
    g.add_argument("--subject", help="a NATS subject filter on original subjects, e.g. 'gs.req.*.batch.>'")
    g.add_argument("--since", help="start of the time window: 15m, 2h, 1d ago, an ISO time or unix seconds")
    g.add_argument("--until", help="end of the time window (same forms)")
    g.add_argument("--seq", help="a sequence range FIRST:LAST (inclusive) of the region's capture stream")
    g.add_argument("--no-dead-letters", action="store_true", help="leave the dead-letter stream out")


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    add_selection_arguments(p)
    g = p.add_argument_group("what to do (default: print readable lines)")
    g.add_argument("--out", type=Path, help="write JSONL here ('-' for stdout)")
    g.add_argument("--republish", action="store_true", help="publish the selection again, under --to-prefix")
    g.add_argument("--to-prefix", default="sandbox", help="subject prefix to republish under (default sandbox)")
    g.add_argument("--live", action="store_true", help="allow --to-prefix to be the live prefix")
    g.add_argument("--speed", type=float, default=1.0,
                   help="1 = original pace, 2 = twice as fast, 0 = as fast as possible")
    g.add_argument("--rerun", action="store_true",
                   help="run the selected requests again through the pipeline and diff the answers")
    for name, kind in (("temperature", float), ("top-p", float), ("max-tokens", int), ("seed", int)):
        g.add_argument(f"--{name}", type=kind, default=None, help=f"with --rerun: use this {name}")


def selection_from(args: argparse.Namespace) -> Selection:
    first, last = parse_seq_range(args.seq) if args.seq else (None, None)
    return Selection(request_id=args.request, conversation_id=args.conversation,
                     subject=args.subject,
                     since=parse_time(args.since) if args.since else None,
                     until=parse_time(args.until) if args.until else None,
                     first_seq=first, last_seq=last, dead_letters=not args.no_dead_letters)


async def load(settings: Settings, selection: Selection) -> tuple[object, list[Captured]]:
    nc = await connect_as(settings.bus, "ops", "grokstack-replay")
    items = [item async for item in capture.read(nc.jetstream(), settings.bus.subjects,
                                                 settings.bus.region, selection)]
    return nc, items


async def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    try:
        selection = selection_from(args)
    except ValueError as exc:
        print(f"grokstack replay: {exc}", file=sys.stderr)
        return 2
    nc, items = await load(settings, selection)
    live = settings.bus.subjects
    try:
        if args.republish:
            sent = await replay.republish(nc, items, live, Subjects(args.to_prefix), args.speed, args.live)
            print(f"republished {sent} messages under {args.to_prefix}.", file=sys.stderr)
        elif args.rerun:
            return await _rerun(nc, settings, items, args)
        elif args.out:
            out = sys.stdout if str(args.out) == "-" else args.out.open("w")
            count = replay.write(items, out, jsonl=True)
            if out is not sys.stdout:
                out.close()
                print(f"{count} messages written to {args.out}", file=sys.stderr)
        else:
            replay.write(items, sys.stdout, jsonl=False)
        return 0
    except replay.LiveSubjectsRefused as exc:
        print(f"grokstack replay: {exc}", file=sys.stderr)
        return 2
    finally:
        await nc.drain()


async def _rerun(nc, settings: Settings, items: list[Captured], args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"temperature": args.temperature, "top_p": args.top_p,
                                   "max_tokens": args.max_tokens, "seed": args.seed}.items()
                 if v is not None}
    client = await JobClient.over(nc, settings.bus.subject_prefix, settings.bus.region)
    different = 0
    async for result in replay.rerun(client, items, overrides):
        print(result.report())
        different += not result.identical
    await client.close()
    return 1 if different else 0


async def run_trace(settings: Settings, request_id: str) -> int:
    nc, items = await load(settings, Selection(request_id=request_id))
    await nc.drain()
    try:
        print(trace.render(request_id, trace.timeline(items, request_id)))
    except LookupError as exc:
        print(f"grokstack trace: {exc}", file=sys.stderr)
        return 1
    return 0
