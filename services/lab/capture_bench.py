"""What capturing costs the token path: token events published and received over core NATS,
with and without the capture stream storing them. Prints both side by side.

    python -m services.lab.capture_bench [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats

from bus.config import BusConfig
from bus.jetstream import declare_streams
from bus.messages import TokenEvent
from bus.codec import encode
from bus.credentials import load_logins
from bus.subjects import Subjects
from services.embedded import EmbeddedNats

REGION = "local"


async def measure(url: str, prefix: str, events: int, capture: bool, rate: float,
                  login: dict | None = None) -> dict[str, float]:
    subjects = Subjects(prefix)
    pub, sub = await nats.connect(url, **(login or {})), await nats.connect(url, **(login or {}))
    if capture:
        await declare_streams(pub.jetstream(), BusConfig(subject_prefix=prefix, region=REGION), subjects)
    latencies: list[float] = []
    done = asyncio.Event()

    async def on_event(msg):
        latencies.append(time.perf_counter() - float(msg.headers["t"]))
        if len(latencies) == events:
            done.set()

    await sub.subscribe(subjects.events_of_edge(REGION, "bench"), cb=on_event)
    await sub.flush()
    payload = encode(TokenEvent(request_id="r1", seq=0, text=" token", token_ids=[1234]))
    start = time.perf_counter()
    for n in range(events):
        await pub.publish(subjects.events(REGION, "bench", f"r{n % 64}"), payload,
                          headers={"t": repr(time.perf_counter())})
        if rate:  # a steady stream, as from decode workers
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        elif n % 256 == 0:
            await asyncio.sleep(0)  # flat out, letting the subscriber run now and then
    await asyncio.wait_for(done.wait(), 60)
    elapsed = time.perf_counter() - start
    stored = 0
    if capture:
        stored = (await pub.jetstream().stream_info(subjects.stream("capture", REGION))).state.messages
    await pub.close()
    await sub.close()
    latencies.sort()
    return {"events/s": events / elapsed, "p50 ms": statistics.median(latencies) * 1000,
            "p99 ms": latencies[int(0.99 * len(latencies))] * 1000, "stored": stored}


async def main(events: int, rate: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp))
        url = server.start()
        # as an operator: it publishes events and reads them back, which no service role does both of
        login = load_logins(server.credentials_file)["ops"].connect_options()
        try:
            for label, pace in (("flat out", 0.0), (f"paced at {rate:.0f}/s", rate)):
                plain = await measure(url, f"plain{int(pace)}", events, False, pace, login)
                captured = await measure(url, f"captured{int(pace)}", events, True, pace, login)
                report(f"{events} token events, {label}", plain, captured, events)
        finally:
            server.stop()


def report(title: str, plain: dict[str, float], captured: dict[str, float], events: int) -> None:
    print(f"{title}: one publisher, one subscriber, core NATS")
    print(f"{'':<12}{'no capture':>14}{'captured':>14}{'ratio':>8}")
    for key in ("events/s", "p50 ms", "p99 ms"):
        print(f"{key:<12}{plain[key]:>14.3f}{captured[key]:>14.3f}{captured[key] / plain[key]:>8.2f}")
    print(f"stored by GS_CAPTURE_{REGION}: {int(captured['stored'])} of {events}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=2000.0, help="events/s of the paced run")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rate))
