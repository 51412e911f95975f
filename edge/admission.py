"""Admission at the edge: refuse at once what would wait too long, so what is accepted is served.

In a spike, queueing everything makes everyone slow; refusing at the door keeps the accepted
requests fast and tells the rest when to come back. Checked in this order:
  1. the tenant's tokens per minute (a token bucket per tenant on this edge): `rate_limited`;
  2. the priority's estimated queue wait (edge/queues.py) over its budget: `overloaded`.
     Batch is degraded first: past half its budget its max_tokens is capped.
     The wait is the one the request would have in a queue: for a prefill (before its first
     token), or after it for a decode slot, whichever is longer; never the time to clear a
     backlog that does not delay it. An accepted request carries the estimate it was judged by
     (`Admitted.estimated_wait_s`), so a bench can hold it against the wait it then had.
     A share of these (`admission_audit_share`, 0 by default) is served instead, as an audit: its
     real queue wait, held against the budget when it ends, says whether refusing it would have
     been right (`grokstack_admission_audits_total`, the refusals' precision in production).
Both refusals are retryable and say after how many seconds a retry is likely to be accepted.
While a pool has no live worker and its replacement is expected (edge/intake.py), its queue does
not drain until then: a refused request is told to come back no sooner than that.
Lower priorities wait behind higher ones, so their estimated wait passes its budget first: in a
spike batch is refused first, then standard, and interactive last.

A request's cost is estimated here from its characters (the edge holds no tokenizer; about 4
characters per token for English text, scaled by what finished answers reported) and its
max_tokens; the tenant's bucket gets back what the answer did not use when it ends.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import msgspec

from bus.messages import ChatMessage, ChatRequest, ErrorEvent, Event, FinalEvent, TokenEvent
from bus.priorities import Priority, PriorityConfig
from edge.live import LiveRequest
from edge.queues import QueueWatch
from edge.regions import Regions
from edge.tenants import Tenant
from edge import metrics
from edge.config import EdgeConfig
from edge.token_bucket import TokenBucket

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # the chat template's role markers around each message
MAX_RETRY_AFTER_S = 60.0


class Refused(Exception):
    def __init__(self, code: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def estimate_prompt_tokens(messages: list[ChatMessage]) -> int:
    return sum(len(m.content) // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE for m in messages) + 1


def retry_after(seconds: float) -> float:
    return round(min(MAX_RETRY_AFTER_S, max(1.0, seconds)), 1)


class PromptScale:
    """Model tokens per estimated token, learnt from the prompt_tokens of finished answers: the
    chat template's markers and the tokenizer make the character estimate several times too low
    for short chat prompts (measured: about 3x for SmolLM2), and the workers count model tokens."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.ratio = 1.0
        self._seen = 0

    def tokens(self, estimated: int) -> int:
        return max(1, round(estimated * self.ratio))

    def learn(self, estimated: int, actual: int) -> None:
        if estimated <= 0 or actual <= 0:
            return
        ratio = actual / estimated
        self._seen += 1
        # the first answers set it outright; later ones move it slowly
        self.ratio = ratio if self._seen == 1 else self.ratio + max(self.alpha, 1 / self._seen) * (ratio - self.ratio)


@dataclass(frozen=True)
class Admitted:
    request: ChatRequest
    charged_tokens: int
    degraded_max_tokens: int | None = None  # max_tokens was capped to this (batch under load)
    estimated_prompt_tokens: int = 0  # by characters, before scaling
    estimated_wait_s: float = 0.0  # the queue wait it was judged by (edge/queues.py)
    audited: bool = False  # over its budget, served to see whether refusing it would have been right


class Admission:
    def __init__(self, config: EdgeConfig, priorities: PriorityConfig, queues: QueueWatch,
                 regions: Regions) -> None:
        self.config = config
        self.queues = queues
        self.regions = regions
        self.policies = priorities.table()
        self.budgets = {p: policy.queue_budget_s for p, policy in self.policies.items()}
        self._buckets: dict[str, TokenBucket] = {}
        self.scale = PromptScale()
        self._audit_draw = random.Random()  # which overloaded requests are audited

    def admit(self, request: ChatRequest, tenant: Tenant, replacement_in_s: float = 0.0) -> Admitted:
        """The request to publish (maybe degraded), or Refused. `replacement_in_s`: a stage of its
        region has no live worker, and one is expected in that many seconds."""
        priority = request.priority
        estimated = estimate_prompt_tokens(request.messages)
        prompt = self.scale.tokens(estimated)
        wait = self.regions.wait_s(request.region, priority)
        budget = self.budgets[priority]
        over = bool(budget) and wait > budget  # refused, unless drawn for an audit
        if over and (replacement_in_s or self._audit_draw.random() >= self.config.admission_audit_share):
            raise self._refuse("overloaded", priority, f"the estimated queue wait for {priority} requests is "
                               f"{wait:.1f} s, over its budget of {budget:g} s", max(wait - budget, replacement_in_s))
        request, degraded = self._degrade(request, wait, budget)
        charged = prompt + request.sampling.max_tokens
        if tenant.tokens_per_minute:
            bucket = self._buckets.setdefault(tenant.name, TokenBucket(tenant.tokens_per_minute / 60,
                                                                        tenant.tokens_per_minute))
            short_s = bucket.take(charged)
            if short_s:
                raise self._refuse("rate_limited", priority, f"tenant {tenant.name!r} may use "
                                   f"{tenant.tokens_per_minute} tokens per minute; this request needs about "
                                   f"{charged}", short_s)
        self.queues.published(request.region, priority, prompt, request.sampling.max_tokens)
        return Admitted(request, charged, degraded, estimated, round(wait, 3), audited=over)

    def _refuse(self, code: str, priority: Priority, message: str, after_s: float) -> Refused:
        metrics.observe_refused(code, priority)
        seconds = retry_after(after_s)
        return Refused(code, f"{message}; retry after {seconds:g} s", seconds)

    def _degrade(self, request: ChatRequest, wait: float, budget: float) -> tuple[ChatRequest, int | None]:
        cap = self.config.degraded_batch_max_tokens
        if (not self.policies[request.priority].degrades or not cap or not budget or wait <= budget / 2
                or request.sampling.max_tokens <= cap):
            return request, None
        sampling = msgspec.structs.replace(request.sampling, max_tokens=cap)
        return msgspec.structs.replace(request, sampling=sampling), cap

    def track(self, live: LiveRequest, admitted: Admitted) -> None:
        """When the request ends: count the room its worker has again, learn its real prompt
        size, and give the tenant back what the answer did not use."""
        live.when_ended(lambda: self.finished(live.tenant, admitted, live.events))

    def finished(self, tenant: str, admitted: Admitted, events: list[Event]) -> None:
        last = events[-1] if events else None
        if isinstance(last, (FinalEvent, ErrorEvent)) and last.worker_id:
            self.queues.job_ended(last.worker_id, last.worker_role)
        final = next((e for e in reversed(events) if isinstance(e, FinalEvent)), None)
        if final is not None:
            self.scale.learn(admitted.estimated_prompt_tokens, final.usage.prompt_tokens)
            if admitted.audited:
                priority = admitted.request.priority
                metrics.observe_admission_audit(priority, final.timings.queue_wait_s > self.budgets[priority])
        bucket = self._buckets.get(tenant)
        if bucket is not None and admitted.charged_tokens:
            bucket.give_back(admitted.charged_tokens - used_tokens(events))


def used_tokens(events: list[Event]) -> int:
    """Prompt plus answer tokens, from the final event. A request that failed is charged only
    the answer tokens it got: the tenant does not pay for our failures."""
    for event in reversed(events):
        if isinstance(event, FinalEvent):
            return event.usage.prompt_tokens + event.usage.completion_tokens
    return sum(len(e.token_ids) for e in events if isinstance(e, TokenEvent))


def retry_after_header(seconds: float) -> int:
    """HTTP's Retry-After is whole seconds."""
    return max(1, math.ceil(seconds))
