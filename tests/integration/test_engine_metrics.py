"""vLLM's own numbers in our metrics, with the real engine: its KV cache size, and speculative
decoding's acceptance from the scheduler's stats. One aggregated worker with n-gram speculation,
in this process and its own region (one engine start), answers a copy-heavy prompt."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from bus.client import JobClient
from bus.credentials import BusAuth
from bus.messages import ChatMessage
from services.processes import start_worker
from tests.conftest import provisioned
from tests.integration.conftest import in_process

pytestmark = pytest.mark.engine
REGION = "specm"
PARAGRAPH = ("The harbour master opened the ledger at dawn, counted the boats that had come in overnight, "
             "wrote the names of their captains in a neat column, and sent a boy to ring the bell twice "
             "so that the fish market would know the catch was ready for sale.")
# n-gram speculation proposes continuations found in the prompt: copying text is its best case
COPY = [ChatMessage(role="user", content=f"Copy this paragraph exactly, word for word:\n\n{PARAGRAPH}")]


async def scrape(port: int, model_name: str) -> dict[tuple[str, frozenset], float]:
    """Samples by name and labels, less `model_name`, which every one carries (the served model)."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert {s.labels.get("model_name") for s in samples} == {model_name}
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
            for s in samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_spec_decoding_acceptance_and_kv_capacity_reach_the_metrics(engine_settings):
    settings = in_process(engine_settings).replace(region=REGION, worker_id=f"{engine_settings.bus.worker_id}-specm",
                                       engine_step_lock="", spec_method="ngram", metrics_port=0)
    worker = await start_worker(provisioned(settings), "aggregated")  # another region: its own streams
    try:
        cache = worker.engine._llm.vllm_config.cache_config  # type: ignore[attr-defined]
        assert worker.engine.kv_capacity_tokens == cache.num_gpu_blocks * cache.block_size > 0
        before = await scrape(worker.metrics_port, settings.served.model_id)
        async with await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix, region=REGION,
                                           auth=BusAuth.of(settings.bus, "ops")) as client:
            result = await client.generate(COPY, max_tokens=60, temperature=0.0, timeout_s=120)
        after = await scrape(worker.metrics_port, settings.served.model_id)
        # with a vLLM engine in this process, the OpenMetrics scrape (the one with exemplars) parses
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{worker.metrics_port}/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            families = list(openmetrics_families(await r.text()))
        assert any(f.name == "grokstack_generation_tokens" for f in families)
        # the engine's own vllm:* metrics, apart, for vLLM's dashboards and autoscalers
        vllm_url = f"http://127.0.0.1:{worker.metrics_port}/metrics/vllm"
        async with aiohttp.ClientSession() as http, http.get(vllm_url) as r:
            vllm_samples = [s for f in text_string_to_metric_families(await r.text()) for s in f.samples]
        names = {s.name for s in vllm_samples}
        assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= names, names
        assert {s.labels.get("model_name") for s in vllm_samples if s.name == "vllm:num_requests_waiting"} == \
            {settings.served.model_id}
    finally:
        await worker.stop(5.0)
    assert result.ok and PARAGRAPH[:40] in result.text

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)
    drafts = moved("grokstack_spec_decode_drafts_total", role="aggregated")
    drafted = moved("grokstack_spec_decode_draft_tokens_total", role="aggregated")
    accepted = moved("grokstack_spec_decode_accepted_tokens_total", role="aggregated")
    print(f"\nspec decoding: {drafts:.0f} drafts, {drafted:.0f} draft tokens, {accepted:.0f} accepted "
          f"({accepted / max(drafted, 1):.0%}) for {result.usage.completion_tokens} tokens; "
          f"KV capacity {worker.engine.kv_capacity_tokens} tokens")
    assert drafts > 0 and drafted >= drafts and accepted > 0
    assert accepted / drafted > 0.3  # a copy: most drafts are right
    assert ("grokstack_kv_cache_usage_ratio", frozenset({("role", "aggregated")})) in after
    assert moved("grokstack_generation_tokens_total", role="aggregated") == result.usage.completion_tokens
    assert not any(name.startswith("vllm") for name, _ in after)  # their own registries: services/telemetry.py
