"""`grokstack bench --target`'s admission check (services/lab/openai_bench.py) against a stack of
fake engines in this process, through the official openai SDK: each served answer's measured queue
wait, each refusal's estimate, the edge's estimate gauge for the answers that carry no estimate
header, and the report's table."""

from __future__ import annotations

import argparse

from services.lab.openai_bench import admission_samples, openai_phase, targets_report
from tests.pipeline.harness import running_stack
from tests.pipeline.test_admission import fake_pools, warm
from edge.client import EdgeClient


async def test_the_target_bench_holds_estimates_against_measured_waits_and_judges_refusals(settings):
    settings = settings.replace(prefill_slots=2, decode_slots=16, queue_poll_s=0.1, queue_budget_interactive_s=0.6,
                                max_inflight_per_connection=64)
    args = argparse.Namespace(max_tokens=16, probe=1, think_s=0.0, concurrency=24, requests=48)
    async with running_stack(settings, *fake_pools(settings, prefill_s=0.2, token_s=0.01)) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            await warm(client, stack.edge.gateway.queues)
        metrics_url = f"http://127.0.0.1:{stack.edge.metrics_port}/metrics"
        phase = await openai_phase("stack", stack.edge.api_url, settings, args, [], metrics_url)
    refused = [s for s in phase.admission if s.refused]
    served = [s for s in phase.admission if not s.refused]
    assert refused and served, phase.errors[:2]  # 24 at once on a pool that takes 10 a second
    assert all(s.estimated_s >= 0.6 and s.priority == "interactive" for s in refused)  # to 0.1 s
    assert len(served) == len(phase.samples) and all(s.measured_s is not None for s in served)
    assert max(s.measured_s for s in served) > 0.2  # they queued
    assert any(s.estimated_s is not None for s in admission_samples(phase) if not s.refused)  # from the gauge
    budgets = {p: policy.queue_budget_s for p, policy in settings.priorities.table().items()}
    report = targets_report([phase], [], argparse.Namespace(**vars(args), **{"url": None}), budgets)
    assert "admission: estimated vs measured queue wait" in report and "refusal precision:" in report
    print(report)
