"""Watching the peers of a worker's pool, so a dead worker's jobs move on at once.

A worker killed outright (SIGKILL, the OOM killer, a lost node) acks nothing and renews nothing:
JetStream hands its jobs on only when their leases (ack_wait, 0.6 s by default) lapse, most of a
migrated answer's pause. Its NATS connection ends at once though, and with it its subscription to
its liveness address (bus/subjects.py `alive`): a probe sent there as a request is answered "no
responders" within a round trip. So every worker holds its own address, keeps the last heartbeat of
each peer of its pool in its region (a beat lists the ack subjects of the jobs its sender holds),
probes the peer it watches every `peer_probe_s` while that peer holds jobs, and on "no responders"
naks the jobs its last beat listed: JetStream redelivers them now, and the watcher pulls at once.

Only one worker may nak a dead peer's job, and only before JetStream redelivered it on its own: a
nak that comes after a redelivery applies to the new delivery (nats-server 2.15) and would hand the
job on a second time. So each peer is watched by the next live worker in name order (a ring), on
which the workers agree but for the moments a worker joins or leaves the pool; a peer found dead is
not watched again until a newer beat of its name is heard (a restart); and its jobs are nak'ed only
within half a lease of the last time its event loop was seen running, which is the loop that renews
the leases: a beat heard, or a probe it answered (`LivenessAnswer`, sent from that loop to the
prober's own address). A peer whose loop stalled long enough for its leases to lapse answers
nothing, and its jobs are left to JetStream. Probing costs a request and an answer per busy worker
per period, whatever the pool's size; a worker alone in its pool is watched by nobody, and its
leases cover it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.codec import BadMessage, decode, encode
from bus.messages import Heartbeat, LivenessAnswer, LivenessProbe
from bus.subjects import Subjects, WorkKind
from inference import metrics

log = structlog.get_logger("grokstack.worker")

NAK = b"-NAK"


def watched_by(me: str, live: Iterable[str]) -> str | None:
    """The peer `me` watches: the one before it in name order, round the ring of the pool's live
    workers (so each is watched by the next); None when `me` is alone."""
    ring = sorted(set(live) | {me})
    if len(ring) < 2:
        return None
    return ring[ring.index(me) - 1]


@dataclass
class Peer:
    leases: tuple[str, ...]  # the ack subjects of the jobs its last beat said it holds
    sent_at: float  # its last beat's own time (its clock): a beat older than that is stale
    heard_at: float  # when that beat came (our monotonic clock)
    # when its event loop, which renews its leases, was last seen running (our monotonic clock):
    # that beat came, or a probe it answered was sent
    loop_seen_at: float


class PeerWatch:
    def __init__(self, nc: NATS, subjects: Subjects, region: str, role: str, kind: WorkKind, me: str,
                 probe_s: float, lease_s: float, forget_after_s: float, on_handed_on: Callable[[], None]) -> None:
        self.nc = nc
        self.subjects = subjects
        self.region = region
        self.role = role
        self.me = me
        self.probe_s = probe_s
        # A dead peer's jobs are nak'ed only this soon after its loop was last seen running: its
        # leases, renewed 6 times a lease from that loop, cannot have lapsed by then.
        self.nak_within_s = lease_s / 2
        self.forget_after_s = forget_after_s  # a peer not heard from this long has left the pool
        self.on_handed_on = on_handed_on
        # Only its pool's jobs may be nak'ed on a peer's word, whatever a beat lists.
        self.lease_prefix = f"$JS.ACK.{subjects.stream(kind, region)}."
        self.peers: dict[str, Peer] = {}
        # peer found dead -> (its last beat's sent_at, when it was found dead on our clock)
        self._gone: dict[str, tuple[float, float]] = {}
        self._subs: list[Subscription] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        address = self.subjects.alive(self.region, self.role, self.me)
        self._subs = [await self.nc.subscribe(address, cb=self._on_address),
                      await self.nc.subscribe(self.subjects.heartbeat(self.region, self.role), cb=self._on_beat)]
        if self.probe_s > 0:
            self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching peers. The worker keeps its address until it holds no job (`release`)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await _unsubscribe(self._subs[1:])

    async def release(self) -> None:
        """Give up its address: a worker that holds no job any more (it drained or handed its jobs
        back, and said so in a last beat) may look dead to its watcher."""
        await _unsubscribe(self._subs[:1])

    async def _on_address(self, msg: Msg) -> None:
        """A probe from the peer that watches us (answer it), or an answer from the one we watch."""
        try:
            said = decode(msg.data, LivenessProbe | LivenessAnswer)
        except BadMessage as exc:
            log.warning("dropped malformed liveness message", reason=exc.reason)
            return
        if isinstance(said, LivenessProbe):
            answer = LivenessAnswer(sent_at=said.sent_at, worker=self.me)
            try:
                await self.nc.publish(self.subjects.alive(self.region, self.role, said.prober), encode(answer))
            except Exception as exc:  # disconnected: the prober sees no answer, as from a stalled loop
                log.debug("liveness answer not sent", error=str(exc))
        else:
            self.answered(said)

    def answered(self, answer: LivenessAnswer, now: float | None = None) -> None:
        peer = self.peers.get(answer.worker)
        if peer is not None and answer.sent_at <= (time.monotonic() if now is None else now):
            peer.loop_seen_at = max(peer.loop_seen_at, answer.sent_at)

    async def _on_beat(self, msg: Msg) -> None:
        try:
            beat = decode(msg.data, Heartbeat)
        except BadMessage as exc:
            log.warning("dropped malformed heartbeat", subject=msg.subject, reason=exc.reason)
            return
        self.heard(beat)

    def heard(self, beat: Heartbeat, now: float | None = None) -> None:
        name = beat.worker_id
        if name == self.me or (name in self._gone and beat.sent_at <= self._gone[name][0]):
            return  # ours, or a dead peer's beat still on its way
        if beat.state == "failed":  # it handed its jobs back itself and exits
            self.peers.pop(name, None)
            return
        leases = tuple(ack for ack in beat.leases if ack.startswith(self.lease_prefix))
        if len(leases) < len(beat.leases):
            log.warning("heartbeat lists leases of another pool; ignored", peer=name,
                        ignored=len(beat.leases) - len(leases))
        if now is None:  # when it was sent, on our clock: it may have waited for our loop to read it
            now = time.monotonic()
            sent = now - max(0.0, time.time() - beat.sent_at)
        else:
            sent = now
        self.peers[name] = Peer(leases, beat.sent_at, now, sent)

    def forget_silent(self, now: float) -> None:
        """Peers not heard from for a while have left the pool, unless they hold jobs that may
        still be handed on (a dead peer's jobs need its watcher's probe, however late it runs)."""
        for name in [n for n, p in self.peers.items() if now - p.heard_at > self.forget_after_s
                     and not (p.leases and now - p.loop_seen_at <= self.nak_within_s)]:
            del self.peers[name]
        for name in [n for n, (_, found) in self._gone.items() if now - found > self.forget_after_s]:
            del self._gone[name]  # a dead peer's beats still on their way come long before

    async def _watch(self) -> None:
        while True:
            started = time.monotonic()
            self.forget_silent(started)
            name = watched_by(self.me, self.peers)
            peer = self.peers.get(name) if name else None
            if name and peer and peer.leases:
                await self._probe(name, peer)
            await asyncio.sleep(max(0.0, self.probe_s - (time.monotonic() - started)))

    async def _probe(self, name: str, peer: Peer) -> None:
        """Ask the server whether anyone holds the peer's address; hand its jobs on if nobody does.
        A live peer answers to our own address (`answered`), not to the request."""
        probe = LivenessProbe(sent_at=time.monotonic(), prober=self.me)
        try:
            await self.nc.request(self.subjects.alive(self.region, self.role, name), encode(probe),
                                  timeout=self.probe_s)
        except nats.errors.NoRespondersError:
            await self._hand_on(name, peer)
        except Exception as exc:  # delivered (no reply comes to a request), or our connection is down
            if not isinstance(exc, nats.errors.TimeoutError):
                log.debug("peer not probed", peer=name, error=str(exc))

    async def _hand_on(self, name: str, peer: Peer) -> None:
        if self.peers.get(name) is not peer:
            return  # a newer beat came while we asked: judge that one next time
        del self.peers[name]
        self._gone[name] = (peer.sent_at, time.monotonic())
        if (stalled_s := time.monotonic() - peer.loop_seen_at) > self.nak_within_s:
            log.warning("peer gone, its loop not seen running for too long to hand its jobs on; their "
                        "leases lapse", peer=name, jobs=len(peer.leases), loop_unseen_s=round(stalled_s, 3))
            return
        handed = 0
        for ack in peer.leases:
            try:
                await self.nc.publish(ack, NAK)
                handed += 1
            except Exception as exc:  # our connection is down: the leases will lapse instead
                log.warning("could not hand on a dead peer's job", peer=name, error=str(exc))
        metrics.observe_peer_gone(self.role, handed)
        log.warning("peer gone: its jobs handed on", peer=name, jobs=handed,
                    last_beat_age_s=round(time.time() - peer.sent_at, 3))
        self.on_handed_on()


async def _unsubscribe(subs: list[Subscription]) -> None:
    for sub in subs:
        try:
            await sub.unsubscribe()
        except Exception:  # the connection is closed, or it was given up already
            pass


