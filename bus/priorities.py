"""Priorities: their order, and the one table of what each may wait and hold.

Work is served highest priority first (each priority has its own subjects and consumers, see
bus/work_queue.py). The policy of a priority is one row of `PriorityConfig.table()`:

  queue_budget_s  the edge refuses a new request whose estimated queue wait is over it (0: never)
  max_share       the share of a worker's token budget that this priority and all below it may
                  hold together, so more urgent work arriving in a spike finds room at once
  min_share       the share of the work served lately it is guaranteed while it has work queued,
                  so outside a spike it is not starved by a steady stream of more urgent work
  degrades        past half its budget, its max_tokens is capped before it is refused (batch:
                  shorter answers for the least urgent work keep more of it accepted)

The edge's admission reads the budgets; workers read the shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from bus.section import Section, Share

Priority = Literal["interactive", "standard", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "standard", "batch")  # highest first

Budget = Annotated[float, Field(ge=0.0)]


@dataclass(frozen=True)
class PriorityPolicy:
    priority: Priority
    queue_budget_s: float
    max_share: float
    min_share: float
    degrades: bool = False


class PriorityConfig(Section):
    """The policy table as settings, one field (and environment variable) per cell."""

    queue_budget_interactive_s: Budget = 2.0
    queue_budget_standard_s: Budget = 8.0
    queue_budget_batch_s: Budget = 20.0
    max_share_standard: Share = 0.8
    max_share_batch: Share = 0.5
    min_share_standard: Share = 0.1
    min_share_batch: Share = 0.05

    def table(self) -> dict[Priority, PriorityPolicy]:
        """Interactive may use everything and needs no guarantee; the others as configured."""
        return {
            "interactive": PriorityPolicy("interactive", self.queue_budget_interactive_s, 1.0, 0.0),
            "standard": PriorityPolicy("standard", self.queue_budget_standard_s, self.max_share_standard,
                                       self.min_share_standard),
            "batch": PriorityPolicy("batch", self.queue_budget_batch_s, self.max_share_batch,
                                    self.min_share_batch, degrades=True),
        }

    @model_validator(mode="after")
    def _consistent(self) -> "PriorityConfig":
        # max shares are cumulative: batch alone may not hold more than standard and batch together
        if self.max_share_batch > self.max_share_standard:
            raise ValueError(f"max_share_batch ({self.max_share_batch}) must not exceed max_share_standard "
                             f"({self.max_share_standard})")
        if self.min_share_standard + self.min_share_batch > 1:
            raise ValueError("min_share_standard + min_share_batch must not exceed 1")
        return self


def at_or_above(priority: Priority) -> tuple[Priority, ...]:
    """The priorities served before or with `priority`."""
    return PRIORITIES[:PRIORITIES.index(priority) + 1]


def at_or_below(priority: Priority) -> tuple[Priority, ...]:
    return PRIORITIES[PRIORITIES.index(priority):]
