"""The roles on the bus, as one table: what each role's workers pull, which stages of a request
they serve, and what a job costs them.

Every process logs in to NATS as one role and may do only what the role may (bus/topology.py says
who publishes and consumes each subject; bus/permissions.py turns that into NATS permissions).
A request goes through two stages, prefill (the prompt and its first token) and decode (the rest);
a worker role serves one or both. An edge is ready when each stage of its region has a live
worker of some role that serves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from bus.subjects import WorkKind

Stage = Literal["prefill", "decode"]
STAGES: tuple[Stage, ...] = ("prefill", "decode")


class Role(StrEnum):
    EDGE = "edge"
    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"
    OPS = "ops"
    CLIENT = "client"


@dataclass(frozen=True)
class RoleSpec:
    role: Role
    summary: str
    pulls: WorkKind | None = None  # the work queue a worker of this role takes jobs from
    stages: tuple[Stage, ...] = ()  # the stages of a request it serves
    # Its jobs hold KV for the answer as well as the prompt (decoding), so a job costs it
    # prompt + max_tokens of its token budget; otherwise only the prompt it computes.
    holds_answer: bool = False

    @property
    def is_worker(self) -> bool:
        return self.pulls is not None


ROLES: dict[Role, RoleSpec] = {spec.role: spec for spec in (
    RoleSpec(Role.EDGE, "takes clients' requests (publishes requests and cancels, reads its events and heartbeats)"),
    RoleSpec(Role.PREFILL, "computes prompts (pulls requests, publishes decode jobs and first tokens)",
             pulls="req", stages=("prefill",)),
    RoleSpec(Role.DECODE, "generates answers (pulls decode jobs, publishes token events)",
             pulls="decode", stages=("decode",), holds_answer=True),
    RoleSpec(Role.AGGREGATED, "prefills and decodes in one engine (pulls requests, publishes token events)",
             pulls="req", stages=("prefill", "decode"), holds_answer=True),
    RoleSpec(Role.OPS, "operates the bus: provisions the streams, replay, trace, chaos tools (may do everything)"),
    RoleSpec(Role.CLIENT, "a back-end service that submits jobs directly (JobClient, `grokstack publish`): its "
             "login is bound to one tenant and one client id (publishes that tenant's requests, reads "
             "its own events)"),
)}

WORKER_ROLES: tuple[Role, ...] = tuple(r for r, spec in ROLES.items() if spec.is_worker)
# The roles of the stack's own processes, which wait for provisioned streams (services/provision.py).
RUNTIME_ROLES: tuple[Role, ...] = (Role.EDGE, *WORKER_ROLES)


def roles_pulling(kind: WorkKind) -> tuple[Role, ...]:
    return tuple(r for r in WORKER_ROLES if ROLES[r].pulls == kind)


def roles_serving(stage: Stage) -> tuple[Role, ...]:
    return tuple(r for r in WORKER_ROLES if stage in ROLES[r].stages)


def job_cost(role: Role, prompt_tokens: int, max_tokens: int) -> int:
    """What a job costs the worker role that serves it, in tokens of its budget: prefill
    computes the prompt; decode (and an aggregated worker, which also decodes) holds KV for the
    prompt and every answer token."""
    return prompt_tokens + (max_tokens if ROLES[role].holds_answer else 0)
