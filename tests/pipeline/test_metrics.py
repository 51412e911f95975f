"""Prometheus metrics of a running stack (real NATS and Redis, fake engines), scraped over HTTP the
way Prometheus does: the edge on its API port, each worker on its own metrics port."""

from __future__ import annotations

import json

import aiohttp
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from edge.client import EdgeClient
from tests.pipeline.harness import bus_client, eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected
from tests.pipeline.test_direct_publish import raw_job
from tests.pipeline.test_openai_api import ready

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Scrape:
    """One scrape: sample values by name and labels, and the exemplars' request ids by name."""

    def __init__(self, body: str, content_type: str) -> None:
        self.content_type = content_type
        parse = parse_openmetrics if content_type.startswith("application/openmetrics-text") else parse_text
        self.values: dict[tuple[str, frozenset], float] = {}
        self.exemplars: dict[str, set[str]] = {}
        self.model_names: set[str | None] = set()  # every sample's model_name, taken off its labels
        for family in parse(body):
            for s in family.samples:
                labels = dict(s.labels)
                self.model_names.add(labels.pop("model_name", None))
                self.values[(s.name, frozenset(labels.items()))] = s.value
                if s.exemplar is not None:
                    self.exemplars.setdefault(s.name, set()).add(s.exemplar.labels.get("request_id", ""))

    def __call__(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str, accept: str = OPENMETRICS) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Accept": accept}) as r:
        assert r.status == 200, await r.text()
        return Scrape(await r.text(), r.headers["Content-Type"])


def urls(stack) -> tuple[str, str, str]:
    host = stack.settings.edge.edge_host
    return (f"http://{host}:{stack.edge.metrics_port}/metrics",  # not on the public API port
            f"http://{host}:{stack.prefill.metrics_port}/metrics",
            f"http://{host}:{stack.decode.metrics_port}/metrics")


async def test_a_chat_moves_the_edge_and_worker_metrics(settings):
    async with running_stack(settings, *engines(settings, delay=0.002)) as stack:
        await ready(stack)
        edge_url, prefill_url, decode_url = urls(stack)
        assert stack.prefill.metrics_port != stack.decode.metrics_port
        edge0, prefill0, decode0 = await scrape(edge_url), await scrape(prefill_url), await scrape(decode_url)
        async with await EdgeClient.connect(stack.url) as client:
            result = await client.complete([{"role": "user", "content": "count my tokens"}], max_tokens=100,
                                           priority="interactive")
        assert result.text == expected("count my tokens") and result.done is not None
        tokens = sum(n for _, n in result.token_times)
        usage = result.done["usage"]
        edge, prefill, decode = await scrape(edge_url), await scrape(prefill_url), await scrape(decode_url)

    assert edge.content_type.startswith("application/openmetrics-text")
    # every sample of every process names the model served, as vLLM's metrics do
    assert edge.model_names == prefill.model_names == decode.model_names == {settings.served.model_id}
    here = {"region": settings.bus.region, "priority": "interactive"}

    def moved(now: Scrape, before: Scrape, name: str, **labels: str) -> float:
        return now(name, **labels) - before(name, **labels)
    # the edge saw one request: one first token, its tokens, its end
    assert moved(edge, edge0, "grokstack_time_to_first_token_seconds_count", **here) == 1
    assert moved(edge, edge0, "grokstack_e2e_request_latency_seconds_count", **here, outcome="stop") == 1
    first_frame = result.token_times[0][1]  # every token after the first frame's is one inter-token gap
    assert moved(edge, edge0, "grokstack_inter_token_latency_seconds_count", **here) == tokens - first_frame
    assert moved(edge, edge0, "grokstack_edge_generation_tokens_total", **here) == tokens == usage["completion_tokens"]
    assert moved(edge, edge0, "grokstack_edge_prompt_tokens_total", **here) == usage["prompt_tokens"]
    assert edge("grokstack_active_streams") == edge0("grokstack_active_streams")  # back where it was
    # the request id ties a latency bucket to this request's logs and bus traffic
    assert result.request_id in edge.exemplars["grokstack_time_to_first_token_seconds_bucket"]
    assert result.request_id in edge.exemplars["grokstack_e2e_request_latency_seconds_bucket"]
    # each worker counted its stage
    assert moved(prefill, prefill0, "grokstack_prompt_tokens_total", role="prefill") == usage["prompt_tokens"]
    assert moved(prefill, prefill0, "grokstack_request_queue_time_seconds_count", stage="prefill",
                 priority="interactive") == 1
    assert moved(decode, decode0, "grokstack_generation_tokens_total", role="decode") == tokens
    assert moved(decode, decode0, "grokstack_request_queue_time_seconds_count", stage="decode",
                 priority="interactive") == 1
    assert moved(decode, decode0, "grokstack_jobs_total", role="decode", outcome="served") == 1


async def test_the_classic_format_without_an_accept_header_and_dead_letters_counted(settings):
    prefix = settings.bus.subject_prefix
    async with running_stack(settings, *engines(settings)) as stack:
        edge_url, prefill_url, _ = urls(stack)
        before = await scrape(prefill_url, accept="")
        assert before.content_type.startswith("text/plain")
        async with bus_client(settings) as nc:  # an invalid job: the prefill worker dead-letters it
            bad = raw_job(prefix, "badmetrics1", "hi", sampling={"max_tokens": 0})
            await nc.jetstream().publish(f"{prefix}.req.local.batch.public.badmetrics1", json.dumps(bad).encode())

            async def counted() -> bool:
                now = await scrape(prefill_url, accept="")
                return now("grokstack_dead_letters_total", kind="req") > before("grokstack_dead_letters_total",
                                                                                kind="req")
            assert await eventually(counted), "the dead letter was not counted"
        async with aiohttp.ClientSession() as http, http.get(edge_url) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            assert "# EOF" not in await r.text()
