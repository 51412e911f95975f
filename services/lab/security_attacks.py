"""The attacks of `grokstack drill security` (services/lab/security_drill.py), each a coroutine
that tries one thing a hostile user would against a running stack and says (refused, how).

"Refused" is read from the stack's answer only: a status code, an error frame's code, a close
code, the server's permission error, a dead-letter count. Anything else (the request was
accepted, a page showed a request id, a stream config was updated) is not refused. Where an
attack needs a control to mean anything (the owner can resume with its token, the allowed Origin
opens a websocket, `Last-Event-ID: -1` replays in order), the control is part of the attack and a
failed control fails it.

Groups: resume, flood, public, origin, numbers, regions, bus, redis, old.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import socket
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import msgspec
import nats
import redis
import websockets

from bus.codec import encode
from bus.credentials import load_logins
from bus.jetstream import connect_as
from bus.messages import ChatMessage, ChatRequest, DeadLetter, SamplingSpec
from bus.priorities import PRIORITIES
from bus.signing import Signer
from bus.subjects import Subjects
from kv_store.block_store import BlockStore
from services.settings import Settings

Outcome = tuple[bool, str]
TERMINAL = ("done", "error", "closed")
RESUME_HEADER = "X-Grokstack-Resume-Token"
MODEL = "@served-model@"  # in an OpenAI body: replaced by the served model's id when sent
OVERSIZE = 300 * 1024  # over the edge's default max_frame_bytes (256 KiB), under its websocket max_size


@dataclass
class Target:
    """The stack under attack and what the attacks share: its settings (ports, bus, Redis), the
    tenants' keys, one finished request of tenant A (the victim) and the background's request ids."""
    settings: Settings
    edge_host: str
    keys: dict[str, str]
    workdir: Path
    metrics_port: int = 0  # the edge's metrics port (not a public one)
    background_ids: set[str] = field(default_factory=set)
    victim_note: str = ""
    _victim: tuple[str, str] | None = None
    model: str = ""  # the served model's id, as /v1/models lists it
    _session: aiohttp.ClientSession | None = None
    _ops: nats.NATS | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://{self.edge_host}:{self.settings.edge.edge_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.edge_host}:{self.settings.edge.api_port}"

    @property
    def subjects(self) -> Subjects:
        return self.settings.bus.subjects

    @property
    def region(self) -> str:
        return self.settings.bus.region

    def key(self, tenant: str) -> str:
        return self.keys[f"tenant-{tenant}"]

    async def http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    async def served_model(self) -> str:
        """The model id the API serves: a request naming another is refused for that alone."""
        if not self.model:
            status, body, _ = await http_get(self, "/v1/models")
            self.model = json.loads(body)["data"][0]["id"] if status == 200 else "unknown"
        return self.model

    async def ops(self) -> nats.NATS:
        if self._ops is None:
            self._ops = await connect_as(self.settings.bus, "ops", "security-drill-ops")
        return self._ops

    async def victim(self) -> tuple[str, str]:
        """A finished request of tenant A and its resume token; checks once that its owner can
        resume it with the token (the control of the resume attacks)."""
        if self._victim is None:
            frames = await ws_ask(self, {"type": "chat", "id": "victim", "max_tokens": 16,
                                         "messages": [{"role": "user", "content": "a private question"}]})
            accepted = next((f for f in frames if f.get("type") == "accepted"), None)
            if accepted is None:
                raise RuntimeError(f"tenant A's request was not accepted: {frames[-1:]}")
            self._victim = (accepted["request_id"], accepted.get("resume_token", ""))
            status, body, _ = await http_get(self, f"/v1/chat/completions/{self._victim[0]}/stream", "a",
                                             {RESUME_HEADER: self._victim[1]})
            self.victim_note = ("owner's resume with its token: served" if status == 200 and "[DONE]" in body
                                else f"owner's resume with its token FAILED ({status})")
        return self._victim

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._ops is not None:
            await self._ops.close()


# ---------------------------------------------------------------------- talking to the doors

def bearer(target: Target, tenant: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {target.key(tenant)}"} if tenant else {}


async def ws_ask(target: Target, *frames: dict | str | bytes, tenant: str | None = "a", timeout: float = 10.0,
                 **connect: Any) -> list[dict]:
    """Send `frames` on a new websocket and collect what comes back until every frame's answer
    ended (done or error), the socket closed ({"type": "closed", "code": ...}) or `timeout`."""
    out: list[dict] = []
    async with websockets.connect(target.ws_url, additional_headers=bearer(target, tenant),
                                  max_size=16 * 1024 * 1024, **connect) as ws:
        ends = 0
        try:
            for frame in frames:
                await ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))
            async with asyncio.timeout(timeout):
                while ends < len(frames):
                    out.append(json.loads(await ws.recv()))
                    ends += out[-1].get("type") in TERMINAL
        except websockets.ConnectionClosed as exc:
            out.append({"type": "closed", "code": exc.rcvd.code if exc.rcvd else None})
        except TimeoutError:
            out.append({"type": "timeout"})
    return out


def codes(frames: list[dict]) -> str:
    return ",".join(str(f.get("code") or f.get("type")) for f in frames if f.get("type") in (*TERMINAL, "timeout"))


def served(frames: list[dict]) -> bool:
    return any(f.get("type") in ("accepted", "token", "done") for f in frames)


async def http_get(target: Target, path: str, tenant: str | None = "a", headers: dict | None = None,
                   port: int | None = None) -> tuple[int, str, dict]:
    session = await target.http()
    base = f"http://{target.edge_host}:{port}" if port else target.api_url
    async with session.get(base + path, headers=bearer(target, tenant) | (headers or {})) as r:
        return r.status, await r.text(), dict(r.headers)


async def http_post(target: Target, body: dict | bytes | str, tenant: str | None = "a") -> tuple[int, str]:
    """POST a chat completion; the body's "model" placeholder becomes the served model's id."""
    session = await target.http()
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    data = data.replace(MODEL, await target.served_model()) if isinstance(data, str) else data
    async with session.post(f"{target.api_url}/v1/chat/completions", data=data,
                            headers=bearer(target, tenant) | {"Content-Type": "application/json"}) as r:
        return r.status, await r.text()


def error_code(body: str) -> str:
    return error_field(body, "code")


def error_field(body: str, name: str) -> str:
    try:
        return json.loads(body)["error"][name] or ""
    except (ValueError, KeyError, TypeError):
        return ""


def chat(content: str = "hello", **fields: Any) -> dict:
    return {"type": "chat", "id": fields.pop("id", "x"), "max_tokens": fields.pop("max_tokens", 4),
            "messages": [{"role": "user", "content": content}], **fields}


def openai(content: str = "hello", **fields: Any) -> dict:
    return {"model": MODEL, "max_tokens": fields.pop("max_tokens", 4),
            "messages": [{"role": "user", "content": content}], **fields}


def all_refused(results: list[tuple[str, bool, str]]) -> Outcome:
    """One outcome of several tries: refused only when every one was; how, each try's answer."""
    return all(r for _, r, _ in results), "; ".join(f"{name} {how}" + ("" if r else " (!)") for name, r, how in results)


# ---------------------------------------------------------------------- 1, 2: resuming another's request

async def ws_resume(target: Target, tenant: str, request_id: str, token: str | None) -> tuple[bool, str]:
    frame = {"type": "resume", "id": "r", "request_id": request_id, "last_seq": -1}
    if token is not None:
        frame["resume_token"] = token
    frames = await ws_ask(target, frame, tenant=tenant)
    return not served(frames), codes(frames) or "nothing"


async def http_resume(target: Target, tenant: str, request_id: str, token: str | None) -> tuple[bool, str]:
    status, body, _ = await http_get(target, f"/v1/chat/completions/{request_id}/stream", tenant,
                                     {RESUME_HEADER: token} if token is not None else {})
    return status >= 400, f"{status}" + (f" {error_code(body)}" if status >= 400 else "")


async def resume_without_token(target: Target) -> Outcome:
    rid, _ = await target.victim()
    ws, http = await ws_resume(target, "a", rid, None), await http_resume(target, "a", rid, None)
    refused, how = all_refused([("ws", *ws), ("http", *http)])
    return refused and "FAILED" not in target.victim_note, f"{how}; {target.victim_note}"


async def resume_wrong_token(target: Target) -> Outcome:
    rid, _ = await target.victim()
    wrong = secrets.token_urlsafe(32)
    return all_refused([("ws", *await ws_resume(target, "a", rid, wrong)),
                        ("http", *await http_resume(target, "a", rid, wrong))])


async def resume_other_tenant(target: Target) -> Outcome:
    rid, token = await target.victim()
    return all_refused([("ws+A's token", *await ws_resume(target, "b", rid, token)),
                        ("http+A's token", *await http_resume(target, "b", rid, token)),
                        ("http no token", *await http_resume(target, "b", rid, None))])


class CaptureReads:
    """Counts the messages anyone reads from the region's capture stream while it is open: an ops
    subscription to every subject sees each consumer delivery (its reply is `$JS.ACK.<stream>...`)
    and each single-message get (a JetStream API request naming the stream)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        stream = target.subjects.stream("capture", target.region)
        self.ack = f"$JS.ACK.{stream}."
        self.gets = (f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}")
        self.count = 0
        self._sub: Any = None

    async def _seen(self, msg: Any) -> None:
        self.count += (msg.reply or "").startswith(self.ack) or msg.subject.startswith(self.gets)

    async def __aenter__(self) -> "CaptureReads":
        self._sub = await (await self.target.ops()).subscribe(">", cb=self._seen)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await (await self.target.ops()).flush()
        await self._sub.unsubscribe()


async def resume_flood(target: Target) -> Outcome:
    """1,000 resumes of random ids with random tokens from one address: every answer a fast 404,
    or a 429 once the client's bucket is empty; never a 2xx or a 5xx, and no capture read."""
    statuses: Counter = Counter()
    fast: list[float] = []
    queue = [uuid.uuid4().hex for _ in range(1000)]

    async def lane() -> None:
        while queue:
            rid = queue.pop()
            t = time.monotonic()
            status, _, _ = await http_get(target, f"/v1/chat/completions/{rid}/stream", "a",
                                          {RESUME_HEADER: secrets.token_urlsafe(32)})
            statuses[status] += 1
            if status == 404:
                fast.append(time.monotonic() - t)

    t0 = time.monotonic()
    async with CaptureReads(target) as reads:
        await asyncio.gather(*(lane() for _ in range(20)))
    wall = time.monotonic() - t0
    fast.sort()
    p50 = f", 404 p50 {fast[len(fast) // 2] * 1000:.0f} ms" if fast else ""
    others = "".join(f", {s} x{n}" for s, n in sorted(statuses.items()) if s not in (404, 429))
    how = f"404 x{statuses[404]}, 429 x{statuses[429]}{others} in {wall:.1f} s{p50}; capture msgs read {reads.count}"
    await asyncio.sleep(3)  # the address's bucket refills for the attacks after this one
    return set(statuses) <= {404, 429} and statuses[429] > 0 and reads.count == 0, how


LOOKUPS = 5


async def unknown_id_lookup(target: Target) -> Outcome:
    """Unknown ids with valid tokens (as a client whose request is long gone would send; the drill
    mints them with the stack secret): each a 404 that reads at most one captured copy per
    priority, however many requests the capture holds, not a scan of the window."""
    from edge.resume import PURPOSE  # the token the edge hands out (edge/resume.py)
    signer = Signer.from_file(target.settings.bus.secret_file)
    held = (await (await target.ops()).jetstream().stream_info(
        target.subjects.stream("capture", target.region))).state.messages
    statuses: Counter = Counter()
    async with CaptureReads(target) as reads:
        for _ in range(LOOKUPS):
            rid = uuid.uuid4().hex
            status, _, _ = await http_get(target, f"/v1/chat/completions/{rid}/stream", "a",
                                          {RESUME_HEADER: signer.token(PURPOSE, "tenant-a", rid)})
            statuses[status] += 1
    per_lookup = reads.count / LOOKUPS
    bound = len(PRIORITIES)
    return (set(statuses) == {404} and per_lookup <= bound,
            f"{', '.join(f'{s} x{n}' for s, n in statuses.items())}; capture msgs read per lookup {per_lookup:.0f} "
            f"(bound {bound}; the capture holds {held})")


# ---------------------------------------------------------------------- 3: what is public

async def metrics_on_api_port(target: Target) -> Outcome:
    status, body, _ = await http_get(target, "/metrics", None)
    try:  # moved, not lost: the edge's metrics port (not published) still serves it
        moved = (await http_get(target, "/metrics", None, port=target.metrics_port))[0]
    except aiohttp.ClientError as exc:
        moved = type(exc).__name__
    return status == 404, (f"API port: {status}" + (f" ({len(body)} bytes)" if status == 200 else "")
                           + f"; the edge's metrics port: {moved}")


async def request_ids_in_public(target: Target) -> Outcome:
    rid, _ = await target.victim()
    ids = set(target.background_ids) | {rid}
    api, edge = target.settings.edge.api_port, target.settings.edge.edge_port
    pages = [(api, p) for p in ("/metrics", "/healthz", "/readyz", "/v1/models")] + \
            [(edge, p) for p in ("/", "/metrics", "/healthz", "/readyz")]
    found = []
    for port, path in pages:
        try:
            status, body, headers = await http_get(target, path, None, port=port)
        except aiohttp.ClientError:
            continue  # the websocket port answers only what it serves
        if any(i in body or i in json.dumps(headers) for i in ids):
            found.append(f"{port}{path}")
    return not found, (f"request ids found on {', '.join(found)}" if found else
                       f"none of {len(ids)} request ids on {len(pages)} public pages")


# ---------------------------------------------------------------------- 4: Origin

async def open_with_origin(target: Target, origin: str | None) -> str:
    try:
        async with websockets.connect(target.ws_url, additional_headers=bearer(target, "a"),
                                      origin=origin) as ws:
            await ws.send(json.dumps(chat()))
            return "opened"
    except websockets.InvalidStatus as exc:
        return str(exc.response.status_code)


async def foreign_origin(target: Target) -> Outcome:
    foreign = await open_with_origin(target, "https://evil.example")
    own = await open_with_origin(target, f"http://127.0.0.1:{target.settings.edge.edge_port}")
    none = await open_with_origin(target, None)
    refused = foreign == "403" and own == "opened" and none == "opened"
    return refused, f"foreign origin: {foreign}; the page's own origin: {own}; no Origin: {none}"


# ---------------------------------------------------------------------- 5: numbers a client controls

def sse_ids(body: str) -> list[int]:
    return [int(line[3:].strip()) for line in body.splitlines() if line.startswith("id:")]


async def last_event_id(target: Target) -> Outcome:
    rid, token = await target.victim()
    status, body, _ = await http_get(target, f"/v1/chat/completions/{rid}/stream", "a",
                                     {RESUME_HEADER: token, "Last-Event-ID": "-1"})
    ids = sse_ids(body)
    full = status == 200 and ids and ids[:-1] == list(range(len(ids) - 1)) and "[DONE]" in body
    results = [("-1", bool(full), f"{status} replay of {len(ids)} events " + ("in order" if full else "NOT in order"))]
    for bad in ("-5", str(10**12), "abc"):
        status, body, _ = await http_get(target, f"/v1/chat/completions/{rid}/stream", "a",
                                         {RESUME_HEADER: token, "Last-Event-ID": bad})
        results.append((bad if len(bad) < 6 else "10**12", status == 400, str(status)))
    for bad_seq in (-5, 10**12):  # the websocket's own field for it
        frames = await ws_ask(target, {"type": "resume", "id": "r", "request_id": rid, "resume_token": token,
                                       "last_seq": bad_seq})
        results.append((f"ws last_seq {bad_seq if bad_seq < 0 else '10**12'}", not served(frames), codes(frames)))
    return all_refused(results)


async def refused_at_both_doors(target: Target, tries: list[tuple[str, dict, dict | str]]) -> Outcome:
    """Each (name, websocket frame, OpenAI body): refused when the frame gets an error before any
    `accepted` and the body a 4xx."""
    results = []
    for name, frame, body in tries:
        frames = await ws_ask(target, frame)
        results.append((f"{name} ws", not served(frames), codes(frames)))
        status, text = await http_post(target, body)
        results.append(("http", 400 <= status < 500, f"{status} {error_code(text)}".strip()))
    return all_refused(results)


async def seed_out_of_range(target: Target) -> Outcome:
    return await refused_at_both_doors(target, [
        ("2**64", chat(seed=2**64), openai(seed=2**64)), ("-1", chat(seed=-1), openai(seed=-1))])


async def sampling_extremes(target: Target) -> Outcome:
    # Python's json writes NaN and Infinity as bare words (not JSON): the door must refuse them
    # whether it reads them as invalid JSON or as out-of-range numbers; 1e999 is valid JSON for inf.
    return await refused_at_both_doors(target, [
        ("temp NaN", json.dumps(chat(temperature=float("nan"))), json.dumps(openai(temperature=float("nan")))),
        ("temp 1e999", json.dumps(chat()).replace('"max_tokens"', '"temperature": 1e999, "max_tokens"'),
         json.dumps(openai()).replace('"max_tokens"', '"temperature": 1e999, "max_tokens"')),
        ("max_tokens 10**12", chat(max_tokens=10**12), openai(max_tokens=10**12))])


# ---------------------------------------------------------------------- 6: invented regions

async def invented_regions(target: Target) -> Outcome:
    """1,000 requests for regions nobody serves, half per door: each refused at once, and none on
    the bus (an ops subscription to every request subject counts what got published)."""
    nc = await target.ops()
    reached: list[str] = []

    async def seen(msg: Any) -> None:
        if msg.subject.split(".")[2] != target.region:
            reached.append(msg.subject)

    sub = await nc.subscribe(f"{target.subjects.prefix}.req.>", cb=seen)
    regions_before = await edge_region_labels(target)
    answers: Counter = Counter()
    accepted = 0
    try:
        async with websockets.connect(target.ws_url, additional_headers=bearer(target, "a")) as ws:
            for i in range(500):
                await ws.send(json.dumps(chat(id=f"g{i}", region=f"zz-invented-{i}")))
                async with asyncio.timeout(10):
                    while True:
                        frame = json.loads(await ws.recv())
                        if frame["type"] == "accepted":
                            accepted += 1
                            await ws.send(json.dumps({"type": "cancel", "id": f"g{i}"}))
                        elif frame["type"] in ("error", "done"):
                            if frame["type"] == "error" and frame.get("code") != "cancelled":
                                about = "region" if "region" in frame.get("message", "") else "not region"
                                answers[f"ws {frame['code']} ({about})"] += 1
                            break
                if accepted >= 20:
                    break  # the hole is open; no need for the rest
        for i in range(500 if accepted < 20 else 0):
            status, text = await http_post(target, openai(region=f"zz-invented-h{i}"))
            if status < 400:
                accepted += 1
                if accepted >= 20:
                    break
            else:
                about = "region" if "region" in (error_field(text, "param") + error_field(text, "message")) else \
                    "not region"
                answers[f"http {status} {error_code(text)} ({about})"] += 1
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await sub.unsubscribe()
    grown = len(await edge_region_labels(target) - regions_before)
    how = (", ".join(f"{k} x{n}" for k, n in answers.most_common(3))
           + f"; accepted {accepted}; on the bus {len(reached)}; edge metrics' regions {len(regions_before)}, +{grown}")
    at_once = answers["ws invalid_request (region)"] + answers["http 400 invalid_request (region)"]
    return accepted == 0 and not reached and at_once == 1000 and grown == 0, how


async def edge_region_labels(target: Target) -> set[str]:
    """The region label values of the edge's metrics: what per-region state it keeps shows there."""
    try:
        status, body, _ = await http_get(target, "/metrics", None, port=target.metrics_port)
    except aiohttp.ClientError:
        return set()
    return set(re.findall(r'region="([^"]*)"', body)) if status == 200 else set()


# ---------------------------------------------------------------------- 7: the bus

@dataclass
class Login:
    """A NATS connection as one login, keeping what the server said (permission violations)."""
    nc: nats.NATS
    said: list[str]

    async def violations(self, wait_s: float = 0.5) -> list[str]:
        try:
            await self.nc.flush(timeout=2)
        except Exception:  # a flush cut short says no more than the errors already heard
            pass
        await asyncio.sleep(wait_s)
        return [s for s in self.said if "permissions violation" in s.lower()]


async def login_as(target: Target, name: str) -> Login:
    """A login from the stack's credentials file by its key (`edge`, `client:<tenant>:<id>` ...)."""
    entry = load_logins(Path(target.settings.bus.nats_credentials))[name]
    said: list[str] = []

    async def error(exc: Exception) -> None:
        said.append(str(exc))

    nc = await nats.connect(target.settings.bus.nats_url, name=f"security-drill-{name}", error_cb=error,
                            max_reconnect_attempts=0, **entry.connect_options())
    return Login(nc, said)


def client_login(target: Target) -> tuple[str, str, str] | None:
    """(login key, tenant, client id) of a `client` role login, if the stack has one."""
    for key in load_logins(Path(target.settings.bus.nats_credentials)):
        parts = key.split(":")
        if parts[0] == "client" and len(parts) == 3:
            return key, parts[1], parts[2]
    return None


def job(target: Target, request_id: str, tenant: str, client_id: str) -> ChatRequest:
    return ChatRequest(request_id=request_id, region=target.region, priority="interactive",
                       messages=[ChatMessage(role="user", content="hi")], sampling=SamplingSpec(max_tokens=2),
                       reply_to=target.subjects.events(target.region, client_id, request_id), tenant=tenant,
                       created_at=time.time())


async def as_client(target: Target, attempt: Callable[[Login, str, str], Awaitable[Outcome]]) -> Outcome:
    found = client_login(target)
    if found is None:
        return False, "no `client` role in the stack's NATS logins: nothing confines a direct publisher"
    key, tenant, client_id = found
    login = await login_as(target, key)
    try:
        return await attempt(login, tenant, client_id)
    finally:
        await login.nc.close()


async def js_attempt(login: Login, call: Callable[[Any], Awaitable[Any]]) -> tuple[bool, str]:
    """A JetStream API call: refused when the server said "permissions violation" (nats-py's
    request then times out) or answered with an authorization error; any other answer (even a
    'not found') means the API was open to this login."""
    try:
        await call(login.nc.jetstream(timeout=2))
        return False, "succeeded"
    except Exception as exc:
        violations = await login.violations(0.2)
        if violations:
            return True, "permissions violation"
        text = str(exc).lower()
        return "authoriz" in text or "permission" in text, f"{type(exc).__name__} {str(exc)[:60]}"


async def client_publish_other_tenant(target: Target) -> Outcome:
    async def attempt(login: Login, tenant: str, client_id: str) -> Outcome:
        rid = uuid.uuid4().hex
        subject = target.subjects.request(target.region, "interactive", "tenant-b", rid)
        await login.nc.publish(subject, encode(job(target, rid, "tenant-b", client_id)))
        violations = await login.violations()
        how = "permissions violation" if violations else "published"
        return bool(violations), f"client of {tenant} publishing as tenant-b: {how}"
    return await as_client(target, attempt)


async def client_other_events(target: Target) -> Outcome:
    async def attempt(login: Login, tenant: str, client_id: str) -> Outcome:
        results = []
        for name, subject in (("another client's", target.subjects.events_of_client("someone-else")),
                              ("every client's", target.subjects.all_events())):
            login.said.clear()
            sub = await login.nc.subscribe(subject)
            violations = await login.violations()
            results.append((name, bool(violations), "permissions violation" if violations else "subscribed"))
            if not login.nc.is_closed:
                await sub.unsubscribe()
        return all_refused(results)
    return await as_client(target, attempt)


async def client_read_capture(target: Target) -> Outcome:
    stream = target.subjects.stream("capture", target.region)
    first = (await (await target.ops()).jetstream().stream_info(stream)).state.first_seq

    async def attempt(login: Login, tenant: str, client_id: str) -> Outcome:
        get = await js_attempt(login, lambda js: js.get_msg(stream, first))
        login.said.clear()
        consume = await js_attempt(login, lambda js: js.pull_subscribe(target.subjects.capture_copies(), stream=stream))
        return all_refused([("direct get", *get), ("consumer", *consume)])
    return await as_client(target, attempt)


async def update_streams_as(target: Target, login: Login) -> Outcome:
    """Update the region's request stream, then its capture, each with its own current config (a
    no-op were it allowed, so a hole does no harm here)."""
    results = []
    for kind in ("req", "capture"):
        stream = target.subjects.stream(kind, target.region)
        config = (await (await target.ops()).jetstream().stream_info(stream)).config
        login.said.clear()
        results.append((stream, *await js_attempt(login, lambda js, config=config: js.update_stream(config))))
    return all_refused(results)


async def client_update_stream(target: Target) -> Outcome:
    return await as_client(target, lambda login, tenant, client_id: update_streams_as(target, login))


async def edge_update_stream(target: Target) -> Outcome:
    edge_key = next(k for k in load_logins(Path(target.settings.bus.nats_credentials)) if k.split(":")[0] == "edge")
    login = await login_as(target, edge_key)
    try:
        return await update_streams_as(target, login)
    finally:
        await login.nc.close()


async def dead_letters_since(target: Target, seq: int, marker: str) -> int:
    """Dead letters stored after stream sequence `seq` whose subject or payload holds `marker`."""
    js = (await target.ops()).jetstream()
    stream = target.subjects.stream("dlq", target.region)
    last = (await js.stream_info(stream)).state.last_seq
    n = 0
    for s in range(seq + 1, last + 1):
        try:
            record = msgspec.json.decode((await js.get_msg(stream, s)).data, type=DeadLetter)
        except Exception:
            continue
        payload = base64.b64decode(record.payload).decode("latin-1") if record.encoding == "base64" else record.payload
        n += marker in record.subject or marker in payload
    return n


async def dead_letter_seq(target: Target) -> int:
    js = (await target.ops()).jetstream()
    return (await js.stream_info(target.subjects.stream("dlq", target.region))).state.last_seq


async def publish_bad_job(target: Target, data: Callable[[str, str, str], bytes]) -> Outcome:
    """Publish a job on a request subject (as the client login if there is one, else ops) and count
    its dead letters: exactly one, after the lease has run out a few times (no redelivery storm)."""
    found = client_login(target)
    key, tenant, client_id = found or ("ops", "tenant-a", "security-drill")
    rid = uuid.uuid4().hex
    subject = target.subjects.request(target.region, "interactive", tenant, rid)
    before = await dead_letter_seq(target)
    login = await login_as(target, key) if found else None
    nc = login.nc if login else await target.ops()
    events = await nc.subscribe(target.subjects.events(target.region, client_id, rid))  # was it served?
    try:
        await nc.jetstream().publish(subject, data(rid, tenant, client_id), timeout=5)
        bus = target.settings.bus
        deadline = time.monotonic() + bus.ack_wait_s * (bus.max_deliver + 2) + 5
        count = 0
        while time.monotonic() < deadline and count == 0:
            await asyncio.sleep(0.5)
            count = await dead_letters_since(target, before, rid)
        await asyncio.sleep(bus.ack_wait_s * 2 + 1)  # a redelivery would have come by now
        count = await dead_letters_since(target, before, rid)
        answered = events.pending_msgs
    finally:
        await events.unsubscribe()
        if login:
            await login.nc.close()
    return count == 1, f"published as {key.split(':')[0]}; dead-lettered {count}x; {answered} events answered it"


async def tenant_mismatch(target: Target) -> Outcome:
    return await publish_bad_job(target, lambda rid, tenant, client: encode(job(target, rid, "tenant-b", client)))


async def poison_message(target: Target) -> Outcome:
    return await publish_bad_job(target, lambda rid, tenant, client: b"\xff\x00garbage " + rid.encode()
                                 + os.urandom(32))


# ---------------------------------------------------------------------- 8: Redis as the stack's user

def redis_refuses(target: Target, command: Callable[[redis.Redis], Any]) -> Outcome:
    client = redis.Redis.from_url(target.settings.kv.redis_url, socket_timeout=5)
    try:
        command(client)
        return False, "executed"
    except redis.ResponseError as exc:
        return True, str(exc).split(",")[0][:70]
    finally:
        client.close()


async def redis_outside_prefix(target: Target) -> Outcome:
    return redis_refuses(target, lambda r: r.set("not-the-stack:planted", b"x"))


async def redis_eval(target: Target) -> Outcome:
    return redis_refuses(target, lambda r: r.eval("return 1", 0))


async def redis_publish(target: Target) -> Outcome:
    return redis_refuses(target, lambda r: r.publish("anything", b"x"))


async def redis_config(target: Target) -> Outcome:
    return redis_refuses(target, lambda r: r.config_get("requirepass"))


async def redis_flushall(target: Target) -> Outcome:
    return redis_refuses(target, lambda r: r.flushall())


async def kv_planted_block(target: Target) -> Outcome:
    """A block written in Redis without the stack's secret, and a stored one with a flipped byte,
    must load as misses. Checked on the stack's BlockStore (the simulated engine's own blocks are
    placeholders it never loads: the vLLM connector's path is not exercised by this drill)."""
    kv = target.settings.kv
    store = BlockStore(kv.redis_url, kv.kv_ttl_s, Signer.from_file(target.settings.bus.secret_file))
    raw = redis.Redis.from_url(kv.redis_url, socket_timeout=5)
    good = f"{kv.kv_key_prefix}:drill-good-{uuid.uuid4().hex}"
    planted = f"{kv.kv_key_prefix}:drill-planted-{uuid.uuid4().hex}"
    try:
        raw.set(good, b"")
    except redis.ResponseError as exc:
        raw.close()
        return False, f"the stack's user may not write its own prefix {kv.kv_key_prefix!r} ({exc}): KV is broken"
    try:
        store.save([(good, b"the real block" * 64)])
        control = store.load([good])[0][0] is not None
        raw.set(planted, b"\x00" * 16 + b"a block an attacker wrote")
        blob = bytearray(raw.getex(good))  # GETEX: the read the stack's user may do
        blob[-1] ^= 1
        raw.set(good, bytes(blob))
        loaded = store.load([planted, good])[0]
    finally:
        raw.close()
    results = [("control (sealed block)", control, "loads" if control else "does not load"),
               ("planted", loaded[0] is None, "miss" if loaded[0] is None else "LOADED"),
               ("corrupted", loaded[1] is None, "miss" if loaded[1] is None else "LOADED")]
    refused, how = all_refused(results)
    return refused, how + "; BlockStore only, engine path not exercised"


# ---------------------------------------------------------------------- 9: the old ones

async def invalid_json(target: Target) -> Outcome:
    frames = await ws_ask(target, "{not json", chat(id="after"))
    after = any(f.get("type") == "done" and f.get("id") == "after" for f in frames)
    return (codes(frames).startswith("invalid_json") and after,
            f"{codes(frames)}; the connection " + ("stayed usable" if after else "did NOT serve the next frame"))


async def oversize_frame(target: Target) -> Outcome:
    frames = await ws_ask(target, chat("x" * OVERSIZE))
    big = await ws_ask(target, chat("x" * 2 * 1024 * 1024))
    status, text = await http_post(target, openai("x" * OVERSIZE))
    return all_refused([("ws 300 KiB", not served(frames), codes(frames)),
                        ("ws 2 MiB", not served(big), codes(big)),
                        ("http 300 KiB", status == 413, f"{status}")])


async def too_many_inflight(target: Target) -> Outcome:
    limit = target.settings.edge.max_inflight_per_connection
    frames = await ws_ask(target, *(chat(id=f"m{i}", max_tokens=64) for i in range(limit + 4)), timeout=60)
    refusals = Counter(f.get("code") for f in frames if f.get("type") == "error")
    return refusals["too_many_requests"] > 0, f"{limit + 4} at once on one connection: " + (
        ", ".join(f"{c} x{n}" for c, n in refusals.items()) or "all accepted")


def ws_frame(text: str) -> bytes:
    """A masked websocket text frame, as a client sends it."""
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def slow_client(target: Target) -> Outcome:
    """A websocket client that asks for long answers and stops reading: the edge must drop it
    (close 1008 "client too slow", or the connection gone) once a send waited send_timeout_s."""
    limit = target.settings.edge.max_inflight_per_connection
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (target.edge_host, target.settings.edge.edge_port))
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(sock, (
            f"GET / HTTP/1.1\r\nHost: {target.edge_host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {target.key('a')}\r\n\r\n"
        ).encode())
        for i in range(limit):
            await loop.sock_sendall(sock, ws_frame(json.dumps(chat("long " * 20, id=f"s{i}",
                                                                    max_tokens=target.settings.edge.max_tokens_limit))))
        await asyncio.sleep(target.settings.edge.send_timeout_s + 15)  # not reading
        received = b""
        gone = False
        until = time.monotonic() + 40
        while time.monotonic() < until:  # now read what was kept for us: its end says what happened
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 3)
            except (TimeoutError, ConnectionError) as exc:
                gone = isinstance(exc, ConnectionError)
                break
            if not chunk:
                gone = True
                break
            received += chunk
    finally:
        sock.close()
    close = received.rfind(b"\x88")  # a close frame from the server: 0x88, length, code
    code = struct.unpack("!H", received[close + 2:close + 4])[0] if 0 <= close <= len(received) - 4 else None
    done = received.count(b'"type":"done"') + received.count(b'"type": "done"')
    dropped = code == 1008 or (gone and done < limit)
    why = {1008: "client too slow", 1011: "keepalive timeout"}.get(code or 0, "connection gone")
    return dropped, (f"dropped (close {code} {why}, {done}/{limit} answers finished)" if dropped else
                     f"kept: {done}/{limit} answers finished, {len(received) // 1024} KiB buffered for it")


# ---------------------------------------------------------------------- the list

@dataclass(frozen=True)
class Attack:
    group: str
    name: str
    run: Callable[[Target], Awaitable[Outcome]]
    timeout_s: float = 60.0


ATTACKS = [
    Attack("resume", "resume A's request, no token", resume_without_token),
    Attack("resume", "resume A's request, wrong token", resume_wrong_token),
    Attack("resume", "resume A's request with B's key", resume_other_tenant),
    Attack("numbers", "Last-Event-ID -1/-5/10**12/abc", last_event_id),
    Attack("numbers", "seed 2**64 and -1, both doors", seed_out_of_range),
    Attack("numbers", "temperature NaN/inf, max_tokens 1e12", sampling_extremes),
    Attack("flood", "resume flood, 1000 random ids", resume_flood),
    Attack("flood", "resume unknown ids with valid tokens", unknown_id_lookup),
    Attack("public", "GET /metrics on the API port", metrics_on_api_port),
    Attack("public", "request ids on public pages", request_ids_in_public),
    Attack("origin", "websocket from a foreign Origin", foreign_origin),
    Attack("regions", "1000 invented regions, both doors", invented_regions, 180.0),
    Attack("bus", "bus client: publish as another tenant", client_publish_other_tenant),
    Attack("bus", "bus client: others' events", client_other_events),
    Attack("bus", "bus client: read the capture", client_read_capture),
    Attack("bus", "bus client: update a stream", client_update_stream),
    Attack("bus", "bus edge: update a stream", edge_update_stream),
    Attack("bus", "bus: body tenant != subject tenant", tenant_mismatch),
    Attack("bus", "bus: poison bytes on a request subject", poison_message),
    Attack("redis", "redis: key outside the prefix", redis_outside_prefix),
    Attack("redis", "redis: EVAL", redis_eval),
    Attack("redis", "redis: PUBLISH", redis_publish),
    Attack("redis", "redis: CONFIG GET", redis_config),
    Attack("redis", "redis: FLUSHALL", redis_flushall),
    Attack("redis", "kv: planted and corrupted blocks", kv_planted_block),
    Attack("old", "invalid JSON frame", invalid_json),
    Attack("old", "oversize frame and body", oversize_frame),
    Attack("old", "too many in flight on one connection", too_many_inflight),
    Attack("old", "slow client stops reading", slow_client, 120.0),
]
