"""Finding a captured request by its id (bus/capture.py find_request, which an edge adopting
another edge's request uses): by its subject, which names its tenant and id, so what a lookup
costs does not grow with what the capture holds. Real NATS/JetStream; requests published as a
client would, with no worker to take them."""

from __future__ import annotations

from bus.capture import find_request
from bus.codec import encode
from bus.messages import ChatMessage, ChatRequest, SamplingSpec
from tests.pipeline.harness import bus_client, eventually


def request(settings, request_id: str, tenant: str = "acme") -> ChatRequest:
    s = settings.bus.subjects
    return ChatRequest(request_id=request_id, region="local", priority="batch", tenant=tenant,
                       messages=[ChatMessage(role="user", content=f"question {request_id}")],
                       sampling=SamplingSpec(max_tokens=4), reply_to=s.events("local", "c1", request_id))


async def publish(nc, settings, requests: list[ChatRequest]) -> None:
    js, s = nc.jetstream(), settings.bus.subjects
    for r in requests:
        await js.publish(s.request(r.region, r.priority, r.tenant, r.request_id), encode(r))


async def captured(js, settings, n: int) -> bool:
    stream = settings.bus.subjects.stream("capture", "local")
    return (await js.stream_info(stream)).state.messages >= n


async def cost(nc, settings, request_id: str, tenant: str = "acme") -> tuple[ChatRequest | None, int, int]:
    """What find_request found, and the messages it sent to and got from the server."""
    before = dict(nc.stats)
    found = await find_request(nc.jetstream(), settings.bus.subjects, "local", request_id, tenant)
    return found, nc.stats["out_msgs"] - before["out_msgs"], nc.stats["in_msgs"] - before["in_msgs"]


async def test_a_lookup_costs_the_same_whatever_the_capture_holds(settings):
    async with bus_client(settings) as nc:
        await publish(nc, settings, [request(settings, "first")])
        assert await eventually(lambda: captured(nc.jetstream(), settings, 1))
        small = [await cost(nc, settings, "first"), await cost(nc, settings, "unknown")]
        await publish(nc, settings, [request(settings, f"r{n}") for n in range(300)])
        assert await eventually(lambda: captured(nc.jetstream(), settings, 301))
        large = [await cost(nc, settings, "first"), await cost(nc, settings, "r150"),
                 await cost(nc, settings, "unknown")]
    assert small[0][0] is not None and small[0][0].request_id == "first"
    assert large[0][0] == small[0][0] and large[1][0].request_id == "r150"
    assert small[1][0] is None and large[2][0] is None
    # a few requests to the server, and one message back per copy of the request: never the others
    assert small[1][1:] == large[2][1:] and large[0][1:] == small[0][1:] == large[1][1:]
    assert max(small[0][1:]) <= 6


async def test_a_request_is_found_only_under_its_own_tenant(settings):
    async with bus_client(settings) as nc:
        await publish(nc, settings, [request(settings, "mine", tenant="acme")])
        assert await eventually(lambda: captured(nc.jetstream(), settings, 1))
        assert (await cost(nc, settings, "mine", "acme"))[0] is not None
        assert (await cost(nc, settings, "mine", "other"))[0] is None
