"""Which peer a worker watches, and which of a peer's beats it believes (inference/peer_watch.py).
The probing and the naks run against a real server in tests/pipeline/test_migration.py."""

from __future__ import annotations

import pytest

from bus.messages import Heartbeat, LivenessAnswer
from bus.subjects import Subjects
from inference.peer_watch import PeerWatch, watched_by

S = Subjects("gs")
ACK = "$JS.ACK.GS_DECODE_eu.decode-eu-standard.1.{}.1.1700000000.0"


def beat(name: str, sent_at: float, *leases: str, state: str = "serving") -> Heartbeat:
    return Heartbeat(worker_id=name, role="decode", region="eu", model_id="m", slots=4, sent_at=sent_at,
                     state=state, leases=list(leases))  # type: ignore[arg-type]


def watch(me: str = "b") -> PeerWatch:
    return PeerWatch(None, S, "eu", "decode", "decode", me, probe_s=0.1, lease_s=0.6, forget_after_s=6.0,  # type: ignore[arg-type]
                     on_handed_on=lambda: None)


def test_each_worker_of_a_pool_is_watched_by_exactly_one_other():
    pool = ["w3", "w1", "w4", "w2"]
    watchers = {me: watched_by(me, pool) for me in pool}
    assert sorted(watchers.values()) == sorted(pool)  # every one watched once
    assert all(watched != me for me, watched in watchers.items())
    assert watchers["w2"] == "w1" and watchers["w1"] == "w4"  # the next in name order, round the ring
    assert watched_by("w1", ["w1"]) is None and watched_by("w1", []) is None  # alone: nobody to watch
    assert watched_by("w5", ["w1", "w3"]) == "w3"  # a newcomer its peers have not heard yet


def test_only_leases_of_its_own_pools_stream_are_kept():
    w = watch()
    w.heard(beat("a", 1.0, ACK.format(7), "$JS.ACK.GS_REQ_eu.req-eu-standard.1.9.1.1.0", "gs.evt.eu.x.y"), now=0.0)
    assert w.peers["a"].leases == (ACK.format(7),)


def test_its_own_beats_and_failed_peers_are_not_watched():
    w = watch(me="b")
    w.heard(beat("b", 1.0, ACK.format(1)), now=0.0)
    w.heard(beat("a", 1.0, ACK.format(2)), now=0.0)
    w.heard(beat("a", 2.0, state="failed"), now=0.1)  # it handed its jobs back itself
    assert w.peers == {}


def test_a_dead_peers_late_beats_are_not_believed_but_a_restart_is():
    w = watch()
    w.heard(beat("a", 10.0, ACK.format(1)), now=0.0)
    w._gone["a"] = (10.0, 0.0)  # as _hand_on leaves it
    del w.peers["a"]
    w.heard(beat("a", 9.5, ACK.format(1)), now=0.1)  # sent before the one it was judged by
    w.heard(beat("a", 10.0, ACK.format(1)), now=0.1)
    assert "a" not in w.peers  # its jobs must not be nak'ed a second time
    w.heard(beat("a", 12.0), now=2.0)  # the same name, started again
    assert w.peers["a"].leases == ()


def test_peers_not_heard_from_are_forgotten():
    w = watch()
    w.heard(beat("a", 1.0), now=0.0)
    w.heard(beat("c", 1.0), now=5.0)
    w.forget_silent(now=7.0)
    assert set(w.peers) == {"c"}


class Publishes:
    """What a PeerWatch sends: its naks."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        self.sent.append((subject, payload))


def test_a_silent_peer_holding_jobs_is_kept_while_its_jobs_may_be_handed_on():
    w = watch()  # a 0.6 s lease: naks within 0.3 s of its last sign of life
    w.forget_after_s = 0.2
    w.heard(beat("a", 1.0, ACK.format(1)), now=0.0)
    w.heard(beat("c", 1.0), now=0.0)
    w.forget_silent(now=0.25)
    assert set(w.peers) == {"a"}  # c left; a may have died with a job its watcher has yet to probe
    w.forget_silent(now=0.35)
    assert w.peers == {}


async def test_a_dead_peers_jobs_are_nakd_only_while_its_loop_was_seen_lately(monkeypatch):
    """Within half a lease of its loop last seen running (a beat, a probe it answered) its leases
    cannot have lapsed; past that they may have, and a nak would hand a redelivered job on twice."""
    w = watch()  # a 0.6 s lease
    w.nc = Publishes()  # type: ignore[assignment]
    clock = [100.0]
    monkeypatch.setattr("inference.peer_watch.time.monotonic", lambda: clock[0])
    w.heard(beat("a", 1.0, ACK.format(1), ACK.format(2)), now=clock[0])
    clock[0] += 0.2
    await w._hand_on("a", w.peers["a"])
    assert w.nc.sent == [(ACK.format(1), b"-NAK"), (ACK.format(2), b"-NAK")]
    assert "a" not in w.peers

    w.nc.sent.clear()
    w.heard(beat("c", 1.0, ACK.format(3)), now=clock[0])
    clock[0] += 1.0  # its loop stalled (no answers): JetStream may have redelivered its job already
    w.answered(LivenessAnswer(sent_at=clock[0] + 0.5, worker="c"))  # not sent yet: not believed
    await w._hand_on("c", w.peers["c"])
    assert w.nc.sent == []

    w.heard(beat("d", 1.0, ACK.format(4)), now=clock[0])
    clock[0] += 1.0
    w.answered(LivenessAnswer(sent_at=clock[0] - 0.1, worker="d"))  # its loop ran after that probe
    await w._hand_on("d", w.peers["d"])
    assert w.nc.sent == [(ACK.format(4), b"-NAK")]


def test_a_beat_read_late_shows_the_loop_ran_when_it_was_sent(monkeypatch):
    w = watch()
    monkeypatch.setattr("inference.peer_watch.time.time", lambda: 1000.0)
    monkeypatch.setattr("inference.peer_watch.time.monotonic", lambda: 50.0)
    w.heard(beat("a", 999.2, ACK.format(1)))  # sent 0.8 s ago: our own loop was slow to read it
    assert w.peers["a"].loop_seen_at == pytest.approx(50.0 - 0.8)
