"""Several regions, each its own JetStream domain, Redis and edge and workers, joined by transit
servers (services/regions.py), on loopback with a WAN delay between them; fake engines."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest

from edge.client import EdgeClient
from services.regions import RegionMesh
from services.settings import Settings
from tests.conftest import unique_prefix
from bus import capture
from bus import metrics as bus_metrics
from bus.capture import Selection
from services import trace
from tests.pipeline.harness import Stack, bus_client, crash_stack, eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected

ONE_WAY_S = 0.03  # the WAN delay into each region


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> RegionMesh:
    mesh = RegionMesh(tmp_path_factory.mktemp("regions"), ["eu", "us"], wan_delay_ms=ONE_WAY_S * 1000)
    mesh.start()
    yield mesh
    mesh.stop()


def region_settings(mesh: RegionMesh, region: str, prefix: str, **changes) -> Settings:
    servers = mesh[region]
    return Settings(nats_url=servers.nats_url, nats_credentials=str(mesh.credentials_file),
                    redis_url=servers.redis_url, region=region, subject_prefix=prefix, kv_key_prefix=f"gskv:{prefix}",
                    edge_port=0, api_port=0, heartbeat_s=0.2, worker_id=f"{region}-{prefix}",
                    data_dir=Path(__file__).resolve().parents[2] / ".data", ack_wait_s=10.0, max_deliver=3,
                    drain_timeout_s=2.0, work_stream_mb=16, dead_letter_stream_mb=8, capture_max_mb=16,
                    max_inflight_per_connection=64, **changes)


@asynccontextmanager
async def regions(mesh: RegionMesh, delay: float | dict[str, float] = 0.0,
                  **changes) -> AsyncIterator[dict[str, Stack]]:
    """A stack in every region of the mesh, each edge hearing every region alive. `delay`: the
    decode engines' time per token, or each region's."""
    prefix = unique_prefix()
    async with AsyncExitStack() as stacks:
        out = {}
        for region in mesh.regions:
            settings = region_settings(mesh, region, prefix, **changes)
            per_token = delay[region] if isinstance(delay, dict) else delay
            out[region] = await stacks.enter_async_context(running_stack(settings, *engines(settings, per_token)))
        for stack in out.values():
            assert await eventually(lambda known=stack.edge.gateway.regions: all(
                known.alive(r) for r in mesh.regions), timeout=10), stack.edge.gateway.regions.known()
        yield out


def served(stack: Stack) -> int:
    return stack.decode.engine.started


async def test_with_capacity_every_request_is_served_in_its_edges_region(mesh):
    async with regions(mesh) as stacks:
        for region, stack in stacks.items():
            async with await EdgeClient.connect(stack.url) as client:
                frames = await asyncio.gather(*(_frames(client, f"local question {n}") for n in range(10)))
            for n, answer in enumerate(frames):
                accepted = answer[0]
                assert (accepted.get("region"), accepted.get("route")) == (region, "home"), accepted
                assert _text(answer) == expected(f"local question {n}")
                assert answer[-1]["usage"]["region"] == region and answer[-1]["usage"]["route"] == "home"
        assert {r: served(s) for r, s in stacks.items()} == {"eu": 10, "us": 10}


async def test_a_stream_served_in_another_region_arrives_once_about_a_round_trip_later(mesh):
    async with regions(mesh) as stacks:
        eu = stacks["eu"]
        # measured from the beats' echoes: the link's two delays at least
        rtt = await eventually(lambda: eu.edge.gateway.regions.rtt_s("us"))
        assert rtt >= 2 * ONE_WAY_S
        async with await EdgeClient.connect(eu.url) as client:
            local = await _frames(client, "near question")
            far = await _frames(client, "far question", region="us")
        assert (far[0]["region"], far[0]["route"]) == ("us", "requested")
        assert _text(far) == expected("far question")
        seqs = [f["seq"] for f in far if f["type"] == "token"]
        assert seqs == list(range(len(seqs)))  # every token once, in order
        near_ttft, far_ttft = local[-1]["usage"]["ttft_ms"], far[-1]["usage"]["ttft_ms"]  # from publishing
        print(f"\ntime to first token: eu->eu {near_ttft:.1f} ms, eu->us {far_ttft:.1f} ms, "
              f"measured round trip {rtt * 1000:.1f} ms")
        assert far_ttft >= 2 * ONE_WAY_S * 1000  # the request went there, its first token came back
        assert served(stacks["us"]) == 1 and served(eu) == 1
        # the trace, from us's capture (where the request was stored), says where and why
        async with bus_client(stacks["us"].settings) as nc:
            items = [i async for i in capture.read(nc.jetstream(), stacks["us"].subjects, "us",
                                                   Selection(request_id=far[0]["request_id"]))]
        far_id = far[0]["request_id"]
        assert "region us (requested)" in trace.render(far_id, trace.timeline(items, far_id))


async def test_a_burst_at_one_region_overflows_to_the_other_and_nothing_is_served_twice(mesh):
    # eu's one decode worker takes 2 at a time, slowly; a burst fills its queue past half the
    # interactive budget (2 s), and the rest goes to us.
    async with regions(mesh, delay=0.05, decode_slots=2, queue_poll_s=0.1) as stacks:
        eu = stacks["eu"]
        async with await EdgeClient.connect(eu.url) as client:
            assert (await client.complete([{"role": "user", "content": "warm up"}])).done
            assert await eventually(lambda: eu.edge.gateway.queues.speed("decode", "eu") > 0)
            contents = [f"burst question {n}" for n in range(30)]
            answers = await asyncio.gather(*(_frames(client, c) for c in contents))
        routes = [a[0].get("route") for a in answers]
        for content, answer in zip(contents, answers, strict=True):
            assert answer[-1]["type"] == "done", answer[-1]
            assert _text(answer) == expected(content)
        overflowed = routes.count("overflow")
        print(f"\nburst of 30 at eu: {routes.count('home')} home, {overflowed} overflow to us")
        assert overflowed and routes.count("home")
        assert served(stacks["us"]) == overflowed and served(eu) == 1 + routes.count("home")


async def _frames(client: EdgeClient, content: str, **params) -> list[dict]:
    return [f async for f in client.stream([{"role": "user", "content": content}], max_tokens=100,
                                           priority="interactive", **params)]


def _text(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


async def test_a_region_killed_mid_stream_its_streams_go_on_elsewhere_exactly_once(mesh):
    """Streams an eu edge sent to us: us dies whole (servers, edge, workers); each stream goes on
    in eu from the token after the last one its client got, and ends with the right text."""
    async with regions(mesh, delay=0.05) as stacks:
        eu, us = stacks["eu"], stacks["us"]
        contents = [f"a long question for the far region {n}" for n in range(6)]
        async with await EdgeClient.connect(eu.url) as client:
            streams = [asyncio.ensure_future(_timed_frames(client, c, region="us")) for c in contents]
            assert await eventually(lambda: us.decode.engine.started == len(contents)
                                    and eu.edge.live.in_flight == len(contents)), "not all streaming in us"
            await asyncio.sleep(0.3)  # a few tokens each
            await crash_stack(us)
            mesh.kill("us")
            answers = await asyncio.wait_for(asyncio.gather(*streams), 60)
            # the survivor keeps accepting: its JetStream is its own
            after = await asyncio.gather(*(client.complete([{"role": "user", "content": f"after the death {n}"}],
                                                           max_tokens=100) for n in range(10)))
            assert all(r.done and r.text == expected(f"after the death {n}") for n, r in enumerate(after))
        try:
            gaps = []
            for content, frames in zip(contents, answers, strict=True):
                assert frames[-1][1]["type"] == "done", frames[-1][1]
                tokens = [f for _, f in frames if f["type"] == "token"]
                assert [f["seq"] for f in tokens] == list(range(len(tokens)))  # once each, in order
                assert "".join(f["text"] for f in tokens) == expected(content)
                usage = frames[-1][1]["usage"]
                assert (usage["region"], usage["route"]) == ("eu", "failover")
                assert usage["completion_tokens"] == len(expected(content))
                times = [t for t, f in frames if f["type"] == "token"]
                gaps.append(max(b - a for a, b in zip(times, times[1:], strict=False)))
            assert eu.decode.engine.started == len(contents) + len(after)  # each continued once, in eu
            gaps.sort()
            print(f"\nus killed mid-stream: {len(contents)}/{len(contents)} streams completed in eu; "
                  f"client-visible token gap p50 {gaps[len(gaps) // 2]:.2f} s, max {gaps[-1]:.2f} s")
        finally:
            mesh.restart("us")


async def _timed_frames(client: EdgeClient, content: str, **params) -> list[tuple[float, dict]]:
    loop = asyncio.get_running_loop()
    return [(loop.time(), f) async for f in client.stream([{"role": "user", "content": content}],
                                                          max_tokens=100, priority="interactive", **params)]


async def test_a_client_whose_region_dies_resumes_at_another_regions_edge(mesh):
    """Streams served in eu for clients of eu's edge: eu dies whole. Each client reconnects to
    us's edge and resumes by request id; us finds the request in its mirror of eu's requests and
    events, goes on from there, and the client gets the rest: every token once, in order."""
    async with regions(mesh, delay=0.05) as stacks:
        eu, us = stacks["eu"], stacks["us"]
        assert await eventually(lambda: {"eu"} <= us.edge.gateway._mirrored and {"us"} <= eu.edge.gateway._mirrored)
        contents = [f"a long question for home {n}" for n in range(4)]
        clients = [await EdgeClient.connect(eu.url) for _ in contents]
        try:
            first_parts = [asyncio.ensure_future(_until_closed(c, content)) for c, content in zip(clients, contents,
                                                                                                   strict=True)]
            assert await eventually(lambda: eu.decode.engine.started == len(contents)), "not all streaming in eu"
            await asyncio.sleep(0.3)  # a few tokens each
            await crash_stack(eu)
            mesh.kill("eu")
            cut = await asyncio.wait_for(asyncio.gather(*first_parts), 30)
            for content, (request_id, frames) in zip(contents, cut, strict=True):
                last_seq = max((f["seq"] for f in frames if f["type"] == "token"), default=-1)
                token = frames[0]["resume_token"]  # from the accepted frame: only the asker was told it
                async with await EdgeClient.connect(us.url) as elsewhere:
                    rest = await asyncio.wait_for(_collect(elsewhere.resume(request_id, last_seq, token)), 30)
                assert rest[0]["type"] == "accepted" and rest[0]["resumed"], rest[0]
                assert rest[-1]["type"] == "done", rest[-1]
                tokens = [f for f in frames + rest if f["type"] == "token"]
                assert [f["seq"] for f in tokens] == list(range(len(tokens)))  # once each, in order
                assert "".join(f["text"] for f in tokens) == expected(content)
                assert rest[-1]["usage"]["region"] == "us"
        finally:
            for c in clients:
                await c.close()
            mesh.restart("eu")


async def test_a_client_whose_edge_dies_resumes_where_its_answer_is_served_and_it_goes_on_there(mesh):
    """A client of eu's edge asked for us; eu dies whole. It resumes at us's edge, which goes on
    with the request in us as its next attempt, and stops only the attempt before: the answer is
    whole, and neither attempt's cancel reaches the other."""
    async with regions(mesh, delay=0.05) as stacks:
        eu, us = stacks["eu"], stacks["us"]
        assert await eventually(lambda: {"eu"} <= us.edge.gateway._mirrored)
        content = "a far question whose asker's region dies"
        client = await EdgeClient.connect(eu.url)
        try:
            part = asyncio.ensure_future(_until_closed(client, content, region="us"))
            assert await eventually(lambda: us.decode.engine.started == 1)
            await asyncio.sleep(0.3)
            await crash_stack(eu)
            mesh.kill("eu")
            request_id, frames = await asyncio.wait_for(part, 30)
            last_seq = max((f["seq"] for f in frames if f["type"] == "token"), default=-1)
            token = frames[0]["resume_token"]
            async with await EdgeClient.connect(us.url) as elsewhere:
                rest = await asyncio.wait_for(_collect(elsewhere.resume(request_id, last_seq, token)), 30)
        finally:
            await client.close()
            mesh.restart("eu")
        assert rest[-1]["type"] == "done", rest[-1]
        tokens = [f for f in frames + rest if f["type"] == "token"]
        assert [f["seq"] for f in tokens] == list(range(len(tokens)))
        assert "".join(f["text"] for f in tokens) == expected(content)
        assert (rest[-1]["usage"]["region"], rest[-1]["usage"]["route"]) == ("us", "failover")
        assert us.decode.engine.aborted == 1  # the first attempt, stopped; the second ran to its end


async def _until_closed(client: EdgeClient, content: str, **params) -> tuple[str, list[dict]]:
    frames = []
    async for frame in client.stream([{"role": "user", "content": content}], max_tokens=100, priority="interactive",
                                     **params):
        if frame["type"] == "error" and frame["code"] == "connection_closed":
            break
        frames.append(frame)
    return frames[0]["request_id"], frames


async def _collect(frames) -> list[dict]:
    return [f async for f in frames]


async def test_a_region_cut_off_then_healed_has_its_late_events_dropped_and_its_work_stopped(mesh):
    """us is cut off from eu mid-answer (its transit stops: links stall as a cut WAN link does).
    eu's edge takes the streams over; the link heals while eu still answers them: us's late events
    reach the edge and are dropped, and us is told to stop what it still works on."""
    async with regions(mesh, delay=0.1) as stacks:
        eu, us = stacks["eu"], stacks["us"]
        contents = [f"a long question to be cut off {n}" for n in range(4)]
        stale_before = _stale_events()
        async with await EdgeClient.connect(eu.url) as client:
            streams = [asyncio.ensure_future(_timed_frames(client, c, region="us")) for c in contents]
            assert await eventually(lambda: us.decode.engine.started == len(contents))
            await asyncio.sleep(0.3)
            mesh.isolate("us")
            try:
                assert await eventually(lambda: all(live.request.attempt == 1 for live in eu.edge.live._live.values()),
                                        timeout=10), "not taken over"
            finally:
                mesh.rejoin("us")  # while eu still answers: the late events meet live streams
            answers = await asyncio.wait_for(asyncio.gather(*streams), 60)
        for content, frames in zip(contents, answers, strict=True):
            tokens = [f for _, f in frames if f["type"] == "token"]
            assert [f["seq"] for f in tokens] == list(range(len(tokens)))  # once each, in order: 0 duplicates
            assert "".join(f["text"] for f in tokens) == expected(content)
            assert frames[-1][1]["usage"]["region"] == "eu"
        # us still generated while cut off (0.1 s a token): told to stop, it aborts
        assert await eventually(lambda: us.decode.engine.aborted == len(contents), timeout=15), \
            us.decode.engine.aborted
        stale = await eventually(lambda: _stale_events() - stale_before, timeout=5)
        print(f"\ncut off and healed: {len(contents)} streams finished in eu, {stale:.0f} late events dropped, "
              f"{us.decode.engine.aborted} superseded answers stopped in us")
        assert stale > 0


async def test_a_dead_region_that_returns_drops_the_work_taken_over_from_it(mesh):
    """us dies with one answer running and two queued; eu takes all three over. When us comes
    back, its JetStream still holds the queued ones: its new workers drop them instead of serving."""
    async with regions(mesh, delay=0.1, decode_slots=1) as stacks:
        eu, us = stacks["eu"], stacks["us"]
        contents = [f"queued in a region that dies {n}" for n in range(3)]
        async with await EdgeClient.connect(eu.url) as client:
            streams = [asyncio.ensure_future(_timed_frames(client, c, region="us")) for c in contents]
            assert await eventually(lambda: us.decode.engine.started == 1 and eu.edge.live.in_flight == 3)
            await asyncio.sleep(0.3)
            await crash_stack(us)
            mesh.kill("us")
            answers = await asyncio.wait_for(asyncio.gather(*streams), 60)
        for content, frames in zip(contents, answers, strict=True):
            assert "".join(f["text"] for _, f in frames if f["type"] == "token") == expected(content)
        mesh.restart("us")
        settings = us.settings
        async with running_stack(settings, *engines(settings, 0.1)) as back:
            decode_jobs = settings.bus.subjects.stream("decode", "us")

            async def queued() -> int:
                async with bus_client(settings) as nc:
                    return (await nc.jetstream().stream_info(decode_jobs)).state.messages

            assert await eventually(lambda: queued(), timeout=5), "the queued decode jobs were lost"
            # the one that was running comes back when its lease lapses (ack_wait_s, 10 s)
            assert await eventually(lambda: _zero(queued()), timeout=20)
            assert back.decode.engine.started == 0  # none of them served again


async def _zero(count) -> bool:
    return await count == 0


def _stale_events() -> float:
    return bus_metrics.STALE_EVENTS._value.get()
