"""The chaos drill's clients (services/lab/chaos.py) against a real edge: a refused client comes back
after the edge's retry-after, not at once, and its refusals are counted apart from failures, while
a lane of another priority goes on being served. Real NATS and Redis, fake engines."""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from services.lab.chaos import Outcome, chat_loop
from tests.pipeline.harness import running_stack
from tests.pipeline.test_chat_flow import engines

RETRY_AFTER_S = 3.0
LOAD_S = 4.0


async def test_a_refused_drill_client_waits_the_retry_after_and_its_refusals_are_not_failures(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        budget = settings.priorities.queue_budget_batch_s
        # batch alone is over its budget by RETRY_AFTER_S: refused with that retry-after
        stack.edge.gateway.queues.wait_s = lambda region, p: budget + RETRY_AFTER_S if p == "batch" else 0.0
        args = argparse.Namespace(max_tokens=20)
        stop_at = time.monotonic() + LOAD_S
        batch: list[Outcome] = []
        interactive: list[Outcome] = []
        await asyncio.gather(chat_loop(stack.url, args, stop_at, 30, random.Random(1), batch, "batch"),
                             chat_loop(stack.url, args, stop_at, 30, random.Random(2), interactive, "interactive"))
    assert batch and all(o.status == "refused" and o.code == "overloaded" for o in batch), batch
    assert all(o.retry_after_s == RETRY_AFTER_S for o in batch)
    # asking again at once would have sent hundreds in LOAD_S; waiting 3 s or more between asks, 2 at most
    assert len(batch) <= 2, [round(o.started - batch[0].started, 2) for o in batch]
    assert len(interactive) > 2 and all(o.status == "completed" for o in interactive)
