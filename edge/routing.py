"""Which region serves a new request, and why.

- `requested`: the client named a region; it gets that one (or a refusal, edge/intake.py).
- `home`: the edge's own region, while it is alive, not draining, serves this model and its
  estimated time to first token for the priority stays under `overflow_share` of the priority's
  queue budget (bus/priorities.py).
- `sticky`: a conversation goes back to the region that served its last turn (where its KV
  is) while that region takes new requests and is not overloaded.
- `overflow`: home is loaded past `overflow_share`; the request goes to the region with the
  lowest estimated time to first token (round trip + queue wait + prefill, edge/regions.py), when
  that is lower than home's. Home takes requests again below `overflow_back_share` (hysteresis,
  so a region on the line does not flap).
- `failover`: home takes no new requests (dead, draining, another model); the alive region with
  the lowest estimate. When none takes new requests, home: the intake (edge/intake.py) then
  refuses, or, while a replacement for a dead pool is expected, queues the request there.

Admission (edge/admission.py) then judges the chosen region's queue wait against the budget, so a
request is refused only when even the best region is over it: overflow comes before refusing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from bus.priorities import Priority, PriorityConfig
from edge.config import EdgeConfig
from edge.regions import Regions

Reason = Literal["home", "requested", "sticky", "overflow", "failover"]
REASONS: tuple[Reason, ...] = ("home", "requested", "sticky", "overflow", "failover")


@dataclass(frozen=True)
class Route:
    region: str
    reason: Reason
    ttft_s: float = 0.0  # the estimate it was chosen by


class Router:
    def __init__(self, home: str, model_id: str, regions: Regions, config: EdgeConfig,
                 priorities: PriorityConfig) -> None:
        self.home = home
        self.model_id = model_id
        self.regions = regions
        self.config = config
        self.budgets = {p: policy.queue_budget_s for p, policy in priorities.table().items()}
        self._overflowing: dict[Priority, bool] = {}
        self._conversations: OrderedDict[str, str] = OrderedDict()  # conversation id -> region

    def choose(self, priority: Priority, conversation_id: str | None = None,
               requested: str | None = None) -> Route:
        if requested:
            return Route(requested, "requested", self.regions.ttft_s(requested, priority))
        candidates = [r for r in self.regions.known() if self.regions.takes_new(r, self.model_id)]
        estimates = {r: self.regions.ttft_s(r, priority) for r in candidates}
        budget = self.budgets[priority]
        sticky = self._conversations.get(conversation_id) if conversation_id else None
        if sticky in estimates and sticky != self.home and not self._over(estimates[sticky], budget):
            return Route(sticky, "sticky", estimates[sticky])
        if self.home not in estimates:
            if not estimates:  # nobody takes it: home, where the intake judges the outage (edge/intake.py)
                return Route(self.home, "home", self.regions.ttft_s(self.home, priority))
            best = min(estimates, key=estimates.__getitem__)
            return Route(best, "failover", estimates[best])
        home = estimates[self.home]
        if not self._overflow(priority, home, budget):
            return Route(self.home, "home", home)
        others = {r: t for r, t in estimates.items() if r != self.home}
        best = min(others, key=others.__getitem__, default=None)
        if best is None or others[best] >= home:
            return Route(self.home, "home", home)
        return Route(best, "overflow", others[best])

    def served(self, conversation_id: str | None, region: str) -> None:
        """The conversation's turn went to `region`: its next turn goes there while it can."""
        if not conversation_id:
            return
        self._conversations[conversation_id] = region
        self._conversations.move_to_end(conversation_id)
        while len(self._conversations) > self.config.sticky_conversations:
            self._conversations.popitem(last=False)

    def _over(self, ttft_s: float, budget: float) -> bool:
        return bool(budget) and ttft_s > budget * self.config.overflow_share

    def _overflow(self, priority: Priority, home_ttft_s: float, budget: float) -> bool:
        """Whether home is loaded past the overflow line, with hysteresis."""
        if not budget:
            return False
        line = self.config.overflow_back_share if self._overflowing.get(priority) else self.config.overflow_share
        self._overflowing[priority] = home_ttft_s > budget * line
        return self._overflowing[priority]
