"""Health endpoints, beside /metrics on each process's metrics port, as an orchestrator (or
`grokstack up`) asks them. A worker: /healthz (its engine and event loop live, its NATS client has
not given up: an outage while it reconnects restarts no worker) and /readyz (its engine
has started and it pulls work). An edge: /healthz (its event loop runs: a NATS outage must not
restart every edge) and /readyz (NATS connected; not the workers: while they are down the edge
stays in the Service and answers 503 with Retry-After itself). The edge's public ports serve no
/metrics (its exemplars are request ids)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

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
        assert (status, body) == (503, f"prefill {settings.bus.worker_name}: nats connection closed for good\n")
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


async def test_the_edge_stays_alive_without_nats_and_ready_without_workers_and_keeps_metrics_off_public_ports(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        edge = stack.edge
        host = settings.edge.edge_host
        base = f"http://{host}:{edge.metrics_port}"
        assert edge.metrics_port not in (edge.port, edge.api_port, 0)
        status, body = await get(f"{base}/metrics")
        assert status == 200 and "grokstack_edge" in body
        assert (await get(f"{base}/healthz")) == (200, "event loop running\nnats=up\n")
        status, body = await get(f"{base}/readyz")
        assert status == 200 and body.startswith("nats=up") and "decode=up" in body
        for public in (edge.api_url.removesuffix("/v1"), f"http://{host}:{edge.port}"):
            status, body = await get(f"{public}/metrics")
            assert status == 404 and "grokstack_" not in body, public
            assert (await get(f"{public}/healthz"))[0] == 200  # the public ports still answer probes

        # the workers go: the edge stays ready (what it tells clients is edge/intake.py's), and says so
        await stack.decode.stop(1.0)
        await stack.prefill.stop(1.0)
        assert await eventually(lambda: not any(edge.gateway.workers_alive().values()), timeout=20)
        status, body = await get(f"{base}/readyz")
        assert status == 200 and "decode=down" in body and "prefill=down" in body

        # NATS lost for good is worth a restart; its loss alone is not ready, but alive
        await edge.nc.close()
        status, body = await get(f"{base}/readyz")
        assert status == 503 and body.startswith("nats=down")
        status, body = await get(f"{base}/healthz")
        assert status == 503 and "closed for good" in body


async def test_an_edge_whose_event_loop_stalls_fails_its_liveness(settings):
    async with running_stack(settings.replace(loop_stall_s=0.5), *engines(settings)) as stack:
        url = f"http://{settings.edge.edge_host}:{stack.edge.metrics_port}/healthz"
        assert (await asyncio.to_thread(_get_blocking, url))[0] == 200
        # the loop is blocked (as by a runaway computation) while a probe comes from outside it
        answer: dict[str, tuple[int, str]] = {}
        probe = threading.Thread(target=lambda: (time.sleep(1.5), answer.update(probe=_get_blocking(url))))
        probe.start()
        time.sleep(3.0)
        probe.join()
        status, body = answer["probe"]
        assert status == 503 and "event loop stalled" in body
        assert await eventually(lambda: _get_blocking(url)[0] == 200)  # running again


def _get_blocking(url: str) -> tuple[int, str]:
    """A probe from another thread (the edge's metrics port answers from a thread of its own)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
