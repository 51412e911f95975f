"""What the edge does while a pool has no live worker (edge/intake.py): a region that never had one
refuses at once; while its only worker died lately (a replacement is starting) requests are
accepted, wait in JetStream and are served once the replacement is up; once it has been gone
longer than the replacement window they are refused with a retry-after of the expected start.
Real NATS and Redis, fake engines, the worker killed as a crash looks."""

from __future__ import annotations

import asyncio

import aiohttp

from edge.client import EdgeClient
from services.lab.fake_engine import FakeEngine
from services.processes import start_edge, start_worker
from tests.pipeline.harness import crash_worker, eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected


def ask(content: str, **params) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 100, **params}


async def test_a_region_that_never_had_a_worker_refuses_at_once(settings):
    edge = await start_edge(settings)  # no worker of its region has ever been heard
    try:
        async with await EdgeClient.connect(edge.url) as client:
            # a guard against waiting for the request's timeout, not a speed measurement
            refused = await asyncio.wait_for(client.complete(**ask("anyone?")), 30)
        assert refused.error["code"] == "unavailable" and refused.error["retry_after_s"] == 2.0
        assert "no prefill or decode worker" in refused.error["message"]
    finally:
        await edge.stop()


async def test_while_a_replacement_starts_requests_wait_and_are_served_then_refused_past_the_window(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        gateway, intake = stack.edge.gateway, stack.edge.server.intake
        async with await EdgeClient.connect(stack.url) as client:
            assert (await client.complete(**ask("before"))).done
            await crash_worker(stack.prefill)  # the only prefill worker
            assert await eventually(lambda: not gateway.workers_alive()["prefill"]), "its death not seen"

            # within the window: accepted at once, each priority, and waiting for a prefill worker
            contents = [f"asked while prefill is down {n}" for n in range(3)]
            waiting = [client.stream(**ask(c, priority=p))
                       for c, p in zip(contents, ("interactive", "standard", "batch"), strict=True)]
            for frames in waiting:
                accepted = await asyncio.wait_for(frames.__anext__(), 30)
                assert accepted["type"] == "accepted", accepted
            await asyncio.sleep(1.0)  # nothing serves them meanwhile

            # the replacement starts (as `grokstack up` or Kubernetes would start it): all served
            replacement = await start_worker(settings, "prefill", engines(settings)[0])
            try:
                for content, frames in zip(contents, waiting, strict=True):
                    rest = [f async for f in frames]
                    assert rest[-1]["type"] == "done", rest[-1]
                    assert "".join(f["text"] for f in rest if f["type"] == "token") == expected(content)

                # the replacement dies too and stays gone past the window: refused, retry at its start
                intake.replacement_window_s = 1.0
                await crash_worker(replacement)
                assert await eventually(lambda: (gateway.regions.stage_gone_s("local", "prefill") or 0) > 1.0)
                refused = await asyncio.wait_for(client.complete(**ask("still down?")), 30)
                assert refused.error["code"] == "unavailable", refused.error
                assert refused.error["retry_after_s"] == intake.expected_start_s
                assert "no prefill worker" in refused.error["message"]
                async with aiohttp.ClientSession() as http:
                    body = {"model": "fake", "messages": [{"role": "user", "content": "still down?"}]}
                    async with http.post(f"{stack.edge.api_url}/chat/completions", json=body) as r:
                        assert r.status == 503 and int(r.headers["Retry-After"]) == int(intake.expected_start_s)
            finally:
                await replacement.stop(1.0)


async def test_while_a_replacement_starts_a_backlog_over_the_budget_is_refused_until_it_is_expected(settings):
    """Accepting while a pool is down is bounded by the priority's queue budget, the queue weighed
    at the speed the pool had: past it, refused with a retry-after no shorter than the time until
    the replacement is expected."""
    settings = settings.replace(queue_poll_s=0.1, queue_budget_batch_s=1.0, max_inflight_per_connection=64,
                                degraded_batch_max_tokens=0)
    prefill = FakeEngine("prefill", token_delay_s=0.0)
    async with running_stack(settings, prefill, engines(settings)[1]) as stack:
        gateway, intake, queues = stack.edge.gateway, stack.edge.server.intake, stack.edge.gateway.queues
        async with await EdgeClient.connect(stack.url) as client:
            for n in range(2):
                assert (await client.complete(**ask(f"warm up {n}"))).done
            assert await eventually(lambda: queues.speed("req", "local") > 0), "no prefill speed advertised"
            await asyncio.sleep(3 * settings.edge.queue_poll_s)  # read while it had a worker
            await crash_worker(stack.prefill)
            assert await eventually(lambda: not gateway.workers_alive()["prefill"])
            queues.wait_s = lambda region, priority: 5.0  # a backlog of 5 s at the speed it had
            refused = await client.complete(**ask("a batch job", priority="batch"))
            assert refused.error["code"] == "overloaded", refused.error
            gone = gateway.regions.stage_gone_s("local", "prefill")
            # no sooner than the replacement's expected start: about a minute, not the 4 s over budget
            assert refused.error["retry_after_s"] >= intake.expected_start_s - gone - 1 > 4.0
