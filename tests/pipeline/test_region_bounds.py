"""A region a client names is one the edge knows, or a refusal before anything is kept for it:
1,000 invented regions through both doors leave the edge's per-region state as it was and put
nothing on the request stream. Real NATS and Redis, fake engines."""

from __future__ import annotations

import asyncio

import aiohttp
import nats
import pytest

from edge import metrics
from edge.client import EdgeClient
from services.processes import RunningEdge
from tests.pipeline.harness import bus_client, eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected

INVENTED = 1000


def region_state(edge: RunningEdge) -> dict[str, int]:
    """The size of every map the edge keeps per region (or per something a region is part of)."""
    regions, queues = edge.gateway.regions, edge.gateway.queues
    return {"regions seen": len(regions._seen), "round trips": len(regions._rtt),
            "prefill times": len(regions._prefill), "stages alive": len(regions._stage_alive_at),
            "queue regions": len(queues._regions),
            "queue depths": len(queues._pending), "published": len(queues._published),
            "pool speeds": len(queues._last_speed), "workers": len(queues._workers),
            "requests held": len(edge.live._live), "conversations": len(edge.live.router._conversations)}


def metric_regions() -> set[str]:
    """Every region that labels a series of the edge's metrics."""
    return {labels[key] for family in metrics.REGISTRY.collect() for sample in family.samples
            for key, labels in ((k, sample.labels) for k in ("region", "from_region", "to_region")) if key in labels}


async def test_invented_regions_are_refused_at_both_doors_and_leave_no_state_and_nothing_published(settings):
    settings = settings.replace(queue_poll_s=0.1)
    async with running_stack(settings, *engines(settings)) as stack, bus_client(settings) as nc:
        edge, queues = stack.edge, stack.edge.gateway.queues
        async with await EdgeClient.connect(stack.url) as client:
            warm = await client.complete([{"role": "user", "content": "warm up"}], max_tokens=50)
            assert warm.done, warm.error
            # the pools' speeds are known and read: the home region's state is all there
            assert await eventually(lambda: len(queues._last_speed) == 2), queues._last_speed
            await asyncio.sleep(3 * settings.edge.queue_poll_s)
            before, labelled = region_state(edge), metric_regions()
            published = await nc.subscribe(stack.subjects.all_work("req"))

            invented = [f"nowhere-{n}" for n in range(INVENTED)]
            ws_refusals = [await client.complete([{"role": "user", "content": "hi"}], region=r)
                           for r in invented[:INVENTED // 2]]
            async with aiohttp.ClientSession() as http:
                async def post(n: int, region: str) -> tuple[int, dict]:
                    body: dict = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
                    headers = {}
                    if n % 2:
                        body["region"] = region
                    else:
                        headers["X-Grokstack-Region"] = region
                    async with http.post(f"{edge.api_url}/chat/completions", json=body, headers=headers) as r:
                        return r.status, (await r.json())["error"]
                http_refusals = [await post(n, r) for n, r in enumerate(invented[INVENTED // 2:])]

            for result in ws_refusals:
                assert result.error is not None and result.error["code"] == "invalid_request", result.error
                assert "unknown region" in result.error["message"] and "local" in result.error["message"]
                assert not result.error["retryable"]
            for status, error in http_refusals:
                assert status == 400 and error["code"] == "invalid_request" and error["param"] == "region", error
                assert "known regions: local" in error["message"]

            assert region_state(edge) == before
            assert metric_regions() == labelled and not any(r.startswith("nowhere-") for r in labelled)
            with pytest.raises(nats.errors.TimeoutError):  # nothing reached the request stream
                await published.next_msg(timeout=0.5)

            # and the edge goes on serving, the home region named or not
            for region in ("local", None):
                served = await client.complete([{"role": "user", "content": "still here"}], region=region)
                assert served.text == expected("still here"), served.error
