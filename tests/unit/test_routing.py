"""Choosing a region (edge/routing.py) from what the region beats say (edge/regions.py): real
objects fed real messages, no server."""

from __future__ import annotations

import time

import pytest

from bus.messages import Echo, Heartbeat, RegionBeat
from edge.queues import MAX_REGIONS, WORKER_MEMORY_S, QueueWatch
from edge.regions import REGION_MEMORY_S, Regions
from edge.routing import Router
from services.settings import Settings

SETTINGS = Settings()
MODEL = SETTINGS.served.model_id
BUDGET = SETTINGS.priorities.queue_budget_interactive_s  # 2 s: overflow past 1 s, back below 0.8 s


def region_beat(region: str, wait_s: float = 0.0, *, edge: str = "x", workers: dict | None = None,
                draining: bool = False, model: str = MODEL, sent_at: float | None = None,
                echoes: dict | None = None) -> RegionBeat:
    return RegionBeat(region=region, edge_id=f"{edge}-{region}", sent_at=sent_at or time.time(),
                      model_ids=[model], workers={"prefill": 1, "decode": 1} if workers is None else workers,
                      queue_wait_s={"interactive": wait_s, "standard": wait_s, "batch": wait_s},
                      draining=draining, echoes=echoes or {})


def home_worker(queues: QueueWatch, region: str = "eu", rate: float = 100.0) -> None:
    for role in ("prefill", "decode"):
        queues.on_beat(Heartbeat(worker_id=f"{region}-{role}", role=role, region=region, model_id=MODEL,
                                 slots=4, rate_tokens_s=rate))


@pytest.fixture
def world():
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    home_worker(queues)
    regions = Regions("eu", "e1", SETTINGS.edge, queues)
    router = Router("eu", MODEL, regions, SETTINGS.edge, SETTINGS.priorities)
    for region in ("eu", "us", "ap"):
        regions.on_beat(region_beat(region))
    return queues, regions, router


def load_home(queues: QueueWatch, wait_s: float) -> None:
    """Queue interactive work at home worth `wait_s` seconds of its 100 tokens/s prefill."""
    queues.costs.add("req", "interactive", 10)  # 0.1 s each at 100 tokens/s
    queues._pending[("req", "eu", "interactive")] = round(wait_s * 10)
    assert queues.wait_s("eu", "interactive") == pytest.approx(wait_s)


def test_with_capacity_every_request_stays_home(world):
    _, _, router = world
    routes = [router.choose("interactive") for _ in range(50)]
    assert {(r.region, r.reason) for r in routes} == {("eu", "home")}


def test_a_dead_home_fails_over_to_the_fastest_alive_region(world):
    queues, regions, router = world
    regions.on_beat(region_beat("us", wait_s=0.5))
    regions.on_beat(region_beat("ap", wait_s=0.1))
    regions._seen["eu"].heard_at -= SETTINGS.edge.region_timeout_s + 0.1  # its beats stopped
    route = router.choose("interactive")
    assert (route.region, route.reason) == ("ap", "failover")
    regions.on_beat(region_beat("eu"))  # back
    assert router.choose("interactive").reason == "home"


def test_a_region_with_a_stage_down_or_draining_or_another_model_takes_nothing_new(world):
    _, regions, router = world
    regions.on_beat(region_beat("eu", workers={"prefill": 1}))  # no decode worker
    assert regions.alive("eu")  # one beat short of a stage is a late heartbeat, not yet a death
    regions._stage_alive_at["eu"]["decode"] -= SETTINGS.edge.region_timeout_s + 0.1  # gone since
    regions.on_beat(region_beat("us", draining=True))
    regions.on_beat(region_beat("ap", model="another-model"))
    assert not regions.takes_new("us", MODEL) and not regions.takes_new("ap", MODEL)
    route = router.choose("interactive")
    # nobody takes it: home, where the intake refuses it or, while a replacement starts, queues it
    assert (route.region, route.reason) == ("eu", "home")
    regions.on_beat(region_beat("ap"))
    assert (router.choose("interactive").region, router.choose("interactive").reason) == ("ap", "failover")


def test_a_loaded_home_overflows_with_hysteresis(world):
    queues, regions, router = world
    regions.on_beat(region_beat("us", wait_s=0.3))
    regions.on_beat(region_beat("ap", wait_s=0.6))
    load_home(queues, 0.9)  # under half the budget
    assert router.choose("interactive").reason == "home"
    load_home(queues, 2.0)  # past it
    route = router.choose("interactive")
    assert (route.region, route.reason) == ("us", "overflow")
    load_home(queues, 0.9)  # back under the line, not under the way back
    assert router.choose("interactive").reason == "overflow"
    load_home(queues, 0.0)
    assert router.choose("interactive").reason == "home"


def test_overflow_goes_nowhere_slower_than_home(world):
    queues, regions, router = world
    regions.on_beat(region_beat("us", wait_s=5.0))
    regions.on_beat(region_beat("ap", wait_s=4.0))
    load_home(queues, 3.0)
    assert router.choose("interactive").reason == "home"  # admission then refuses it, as it would anyway


def test_a_conversation_goes_back_where_its_last_turn_was_while_that_region_can(world):
    queues, regions, router = world
    router.served("conv-1", "us")
    assert (router.choose("interactive", "conv-1").region, router.choose("interactive", "conv-1").reason) == \
        ("us", "sticky")
    assert router.choose("interactive", "conv-2").reason == "home"
    regions.on_beat(region_beat("us", wait_s=1.5))  # overloaded: not worth the KV
    assert router.choose("interactive", "conv-1").region == "eu"
    regions.on_beat(region_beat("us", draining=True))
    assert router.choose("interactive", "conv-1").region == "eu"


def test_a_region_the_client_names_is_kept(world):
    _, _, router = world
    route = router.choose("batch", requested="ap")
    assert (route.region, route.reason) == ("ap", "requested")


def test_the_round_trip_is_measured_from_echoes_without_comparing_clocks():
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    regions = Regions("eu", "e1", SETTINGS.edge, queues)
    sent = time.time() - 0.25  # our beat went out 250 ms ago; the other edge held it 150 ms
    regions.on_beat(region_beat("us", echoes={"e1": Echo(sent_at=sent, held_s=0.15)}, sent_at=1.0))
    assert regions.rtt_s("us") == pytest.approx(0.10, abs=0.02)
    assert regions.ttft_s("us", "interactive") == pytest.approx(0.10, abs=0.02)


def test_this_edge_beats_for_the_regions_whose_workers_it_hears_and_hands_back_what_it_heard():
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    home_worker(queues, "eu")
    home_worker(queues, "draft")
    regions = Regions("eu", "e1", SETTINGS.edge, queues)
    regions.on_beat(region_beat("us", sent_at=123.0))
    beats = regions.beats([MODEL], "eu")
    assert [b.region for b in beats] == ["draft", "eu"]
    assert beats[1].workers == {"prefill": 1, "decode": 1} and beats[1].free_slots == 8
    assert beats[1].echoes["x-us"].sent_at == 123.0 and beats[1].echoes["x-us"].held_s >= 0


def test_regions_a_bus_peer_invents_are_bounded_and_dead_ones_make_room(world):
    queues, regions, _ = world
    for n in range(MAX_REGIONS + 100):  # all beating: the first that fit are kept, the rest ignored
        regions.on_beat(region_beat(f"lie-{n}"))
    assert len(regions._seen) == MAX_REGIONS and not regions.knows(f"lie-{MAX_REGIONS + 99}")
    for region, seen in regions._seen.items():
        if region != "eu":  # all but home go silent: dead, so a new one takes the longest silent's place
            seen.heard_at -= SETTINGS.edge.region_timeout_s + 1
    regions.on_beat(region_beat("new"))
    assert len(regions._seen) == MAX_REGIONS and regions.knows("new") and regions.knows("eu")
    regions._seen["new"].heard_at -= REGION_MEMORY_S + 1  # silent for an hour: forgotten
    regions.beats([MODEL], "eu")  # every beat period
    assert not regions.knows("new") and "new" not in regions._stage_alive_at
    assert len(regions._rtt) <= MAX_REGIONS and len(regions._stage_alive_at) <= MAX_REGIONS


def test_workers_of_invented_regions_are_bounded_and_the_gone_forgotten(world):
    queues, _, _ = world
    for n in range(MAX_REGIONS + 50):
        home_worker(queues, f"lie-{n}")
    assert len(queues.regions_heard()) == MAX_REGIONS  # "local" (the bus's own) and "eu" among them
    assert {SETTINGS.bus.region, "eu"} <= queues.regions_heard()
    for worker in queues._workers.values():
        worker.seen -= WORKER_MEMORY_S + 1
    queues.forget_gone()
    assert queues.regions_heard() == {SETTINGS.bus.region} and not queues._workers


def test_only_known_regions_may_be_named_and_a_stage_remembers_when_it_last_had_a_worker(world):
    queues, regions, _ = world
    assert regions.knows("eu") and regions.knows("us") and not regions.knows("mars")
    assert regions.names() == sorted({"ap", "eu", "us", SETTINGS.bus.region})
    assert regions.stage_gone_s("us", "prefill") == pytest.approx(0, abs=0.5)
    regions._stage_alive_at["us"]["prefill"] -= 30  # its last beat with a prefill worker, 30 s ago
    regions.on_beat(region_beat("us", workers={"decode": 1}))
    assert regions.stage_gone_s("us", "prefill") == pytest.approx(30, abs=0.5)
    assert regions.stage_gone_s("us", "decode") == pytest.approx(0, abs=0.5)
    assert regions.stage_gone_s("mars", "prefill") is None
    queues._workers[("eu-prefill", "prefill")].seen -= 10  # home: from the workers' own heartbeats
    assert regions.stage_gone_s("eu", "prefill") == pytest.approx(10, abs=0.5)
