"""A worker's health endpoints, beside /metrics on its metrics port, as an orchestrator (or
`grokstack up`) asks them: /healthz (its NATS connection is up) and /readyz (its engine has started
and it pulls work)."""

from __future__ import annotations

import asyncio

import aiohttp

from edge.client import EdgeClient
from tests.pipeline.harness import eventually, running_stack
from tests.pipeline.test_chat_flow import engines


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.text()


async def test_a_serving_worker_is_healthy_and_ready_and_one_that_lost_nats_is_neither(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        host = stack.settings.edge.edge_host
        for worker in (stack.prefill, stack.decode):
            base = f"http://{host}:{worker.metrics_port}"
            assert await get(f"{base}/healthz") == (200, f"{worker.role} {settings.bus.worker_name}: ok\n")
            status, body = await get(f"{base}/readyz")
            assert (status, body) == (200, f"{worker.role} {settings.bus.worker_name}: pulling=yes nats=up\n")
            status, body = await get(f"{base}/metrics")  # still served beside them
            assert status == 200 and "grokstack_jobs_total" in body

        await stack.prefill.nc.close()  # as when the connection is lost for good
        base = f"http://{host}:{stack.prefill.metrics_port}"
        status, body = await get(f"{base}/healthz")
        assert (status, body) == (503, f"prefill {settings.bus.worker_name}: nats disconnected\n")
        status, body = await get(f"{base}/readyz")
        assert status == 503 and "nats=down" in body
        assert (await get(f"http://{host}:{stack.decode.metrics_port}/readyz"))[0] == 200  # each its own


async def test_a_draining_worker_is_no_longer_ready_while_it_finishes_its_job(settings):
    async with running_stack(settings, *engines(settings, delay=0.05)) as stack:
        decode = stack.decode
        url = f"http://{stack.settings.edge.edge_host}:{decode.metrics_port}/readyz"
        async with await EdgeClient.connect(stack.url) as client:
            answer = asyncio.create_task(client.complete([{"role": "user", "content": "a long answer"}],
                                                         max_tokens=60))
            assert await eventually(lambda: decode.worker.counters.served == 0 and decode.worker.budget.reserved)
            stopping = asyncio.create_task(decode.stop(30.0))  # SIGTERM's drain
            status, body = await get(url)
            assert (status, body) == (503, f"decode {settings.bus.worker_name}: pulling=no nats=up\n")
            result = await answer
            await stopping
    assert result.done is not None, result.error  # it finished the job it held
