"""A worker's token budget: how much work it holds, measured in tokens, and who may take more.

A job costs tokens, not a slot: a prefill job the prompt tokens it computes, a decode job the
KV its sequence will occupy (prompt + max_tokens). A worker pulls a job only while it has room
for the largest job there can be (`max_job`), so whatever arrives fits: vLLM's continuous batch
stays full but never over-full, and nothing taken waits inside the engine.

Lower priorities may hold only part of the budget (`caps`, cumulative: standard and batch
together at most 80 %, batch alone at most 50 % by default), so interactive work arriving in a
spike finds room at once instead of queueing behind long batch answers.

Costs are reserved as `max_job` when a message is pulled (its size is unknown until it is
read), then settled to the job's real cost once parsed, and released when the job ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bus.priorities import PRIORITIES, Priority, PriorityConfig, at_or_below
from bus.roles import ROLES, Role
from inference.config import WorkerConfig


@dataclass
class Ticket:
    """One job's hold on the budget."""
    priority: Priority
    tokens: int
    released: bool = False


@dataclass
class TokenBudget:
    capacity: int  # tokens the worker may hold at once
    slots: int  # jobs it may hold at once (the engine's max_num_seqs)
    max_job: int  # tokens the largest possible job costs
    caps: dict[Priority, float] = field(default_factory=lambda: {p: 1.0 for p in PRIORITIES})
    _held: dict[Priority, int] = field(default_factory=lambda: {p: 0 for p in PRIORITIES})
    _jobs: dict[Priority, int] = field(default_factory=lambda: {p: 0 for p in PRIORITIES})

    def __post_init__(self) -> None:
        self.max_job = max(1, min(self.max_job, self.capacity))

    @property
    def reserved(self) -> int:
        return sum(self._held.values())

    @property
    def jobs(self) -> int:
        return sum(self._jobs.values())

    def room(self, priority: Priority) -> int:
        """How many more jobs of `priority` may be pulled now, each counted as `max_job`."""
        below = at_or_below(priority)
        cap = self.caps[priority]
        token_room = min(self.capacity - self.reserved,
                         math.floor(cap * self.capacity) - sum(self._held[p] for p in below))
        slot_room = min(self.slots - self.jobs,
                        max(1, math.floor(cap * self.slots)) - sum(self._jobs[p] for p in below))
        return max(0, min(token_room // self.max_job, slot_room))

    def hold(self, priority: Priority) -> Ticket:
        """A pulled message whose cost is not known yet: hold the most a job can cost."""
        self._held[priority] += self.max_job
        self._jobs[priority] += 1
        return Ticket(priority, self.max_job)

    def settle(self, ticket: Ticket, tokens: int) -> None:
        """The job's real cost, now it has been read (never more than `max_job`)."""
        tokens = max(0, min(tokens, self.max_job))
        if not ticket.released:
            self._held[ticket.priority] += tokens - ticket.tokens
        ticket.tokens = tokens

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self._held[ticket.priority] -= ticket.tokens
        self._jobs[ticket.priority] -= 1


def budget_for(config: WorkerConfig, priorities: PriorityConfig, role: Role, slots: int, max_model_len: int,
               kv_capacity_tokens: int) -> TokenBudget:
    """A role that holds answers is bounded by the KV its sequences hold (the engine's cache unless
    configured); one that only computes prompts by the prompt tokens it works on at once."""
    if ROLES[role].holds_answer:
        capacity = config.decode_token_budget or kv_capacity_tokens
    else:
        capacity = config.prefill_token_budget
    caps = {p: policy.max_share for p, policy in priorities.table().items()}
    return TokenBudget(capacity=max(1, capacity), slots=slots, max_job=max_model_len, caps=caps)
