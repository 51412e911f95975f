"""The bus topology (bus/topology.py): one table of who sends, receives and pulls what, which the
NATS permissions and the AsyncAPI document are both generated from."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bus.capture import subject_matches
from bus.permissions import permissions
from bus.roles import ROLES, WORKER_ROLES, Role, roles_pulling
from bus.subjects import Subjects
from bus.topology import CHANNELS, GRANTS, OPERATIONS, Channel, Tokens, Use, channel_named, roles_that

S = Subjects("gs")


def test_every_role_is_in_the_table():
    assert {op.role for op in OPERATIONS} | {r for g in GRANTS for r in g.roles} == set(Role)
    assert len({op.name for op in OPERATIONS}) == len(OPERATIONS)


def test_the_work_queues_are_pulled_by_the_roles_that_pull_them():
    for channel in CHANNELS:
        pullers = roles_that("pull", channel.name)
        assert pullers == (roles_pulling(channel.work) if channel.work else ()), channel.name
    assert {r for c in CHANNELS for r in roles_that("pull", c.name)} == set(WORKER_ROLES)


def test_every_worker_wakes_up_beats_and_hears_cancels_and_exhausted_jobs():
    for name, action in (("doorbells", "receive"), ("maxDeliveries", "receive"), ("cancels", "receive"),
                         ("heartbeats", "send"), ("events", "send"), ("deadLetters", "send"),
                         ("heartbeats", "receive"), ("liveness", "receive"), ("liveness", "send")):
        assert set(roles_that(action, name)) >= set(WORKER_ROLES), name
    assert roles_that("send", "heartbeats") == WORKER_ROLES  # the document's `role` parameter


# An owner that is not the role's own, for each kind of `owned_by`.
OTHER = {"role": lambda role: "decode" if role != Role.DECODE else "prefill",
         "client": lambda role: "e2",
         "tenant": lambda role: "other",
         "kind": lambda role: "decode" if ROLES[role].pulls == "req" else "req"}


def own_tokens(role: Role) -> Tokens:
    kind = ROLES[role].pulls or "req"
    return Tokens(region="eu", priority="batch", client="e1", tenant="acme", request_id="r1", role=str(role), kind=kind,
                  consumer=S.consumer(kind, "eu", "batch"), worker="w1")


@pytest.mark.parametrize("channel", [c for c in CHANNELS if c.owned_by], ids=lambda c: c.name)
def test_an_own_use_reaches_the_roles_own_addresses_only(channel: Channel):
    for use in channel.uses:
        if use.action == "pull":
            continue  # through the JetStream API, not the subjects (test_permissions.py)
        for role in use.roles:
            # a client login is bound to its tenant and id; the others ignore the tenant
            allowed = permissions(role, S, edge_id="e1", regions=("eu",),
                                  tenant="acme" if role == Role.CLIENT else None)
            if allowed.publish == (">",):
                continue  # ops
            patterns = allowed.publish if use.action == "send" else allowed.subscribe
            mine = own_tokens(role)
            others = replace(mine, **{channel.owned_by: OTHER[channel.owned_by](role)})
            assert any(subject_matches(p, channel.address(S, mine)) for p in patterns), (role, channel.name)
            reaches_others = any(subject_matches(p, channel.address(S, others)) for p in patterns)
            assert reaches_others != use.own, (role, channel.name)


def test_addresses_are_built_from_the_subjects():
    mine = own_tokens(Role.PREFILL)
    assert channel_named("requests").address(S, mine) == S.request("eu", "batch", "acme", "r1")
    assert channel_named("captureCopies").address(S, mine) == "gs.cap.req.eu.batch"
    assert channel_named("doorbells").address(S, mine) == "gs.bell.req.eu.batch"
    assert channel_named("liveness").address(S, mine) == "gs.alive.eu.prefill.w1"
    host_pid = replace(mine, worker="node-3.example.com-41")  # not a token: its hash stands for it
    assert channel_named("liveness").address(S, host_pid) == S.alive("eu", "prefill", "node-3.example.com-41")
    assert S.alive("eu", "prefill", "node-3.example.com-41").count(".") == 4
    assert channel_named("maxDeliveries").address(S, mine) == \
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.GS_REQ_eu.req-eu-batch"


def test_a_table_that_cannot_be_enforced_is_refused():
    requests = replace(channel_named("requests"), owned_by=None, own=None,
                       uses=(Use("send", (Role.EDGE,), "requests"),))
    with pytest.raises(ValueError, match="only a work queue can be pulled"):
        replace(channel_named("cancels"), uses=(Use("pull", WORKER_ROLES, "take cancels"),))
    with pytest.raises(ValueError, match="whose addresses"):
        replace(requests, uses=(Use("send", (Role.EDGE,), "own requests", own=True),))
    with pytest.raises(ValueError, match="every address"):
        replace(channel_named("maxDeliveries"), uses=(Use("receive", (Role.EDGE,), "all advisories"),))
