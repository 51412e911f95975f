"""`grokstack drill security`: start a stack, attack it as a hostile user would, and print one
line per attack: refused or not, how, and whether the stack kept serving a well-behaved client.

The stack is services/lab/sim_cluster.py's (its own embedded nats-server and Redis-compatible
server, one edge process, one prefill and one decode worker with simulated engines), with an API
keys file of two tenants, so the drill takes a minute or two and needs no model. While the attacks
(services/lab/security_attacks.py) run one after another, a background client of tenant A keeps
chatting; an attack's "others served" is yes when that client got at least one more answer during
the attack (or just after it) and saw no error.

Every verdict comes from what the stack answered (status codes, error codes, close codes, the
server's permission errors, dead-letter counts), never from what it is expected to do: a hole
still open reads NOT REFUSED. The exit code is 0 only when every attack was refused and the
background client was served throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import websockets

from edge.tenants import add_key
from services.lab.common import run_drill
from services.lab.security_attacks import ATTACKS, Attack, Target
from services.lab.sim_cluster import SimCluster
from services.settings import Settings

TENANTS = ("tenant-a", "tenant-b")
SERVED_WAIT_S = 20.0  # after an attack, how long the background client may take to be served again
BACKGROUND_MAX_TOKENS = 8
BACKGROUND_TIMEOUT_S = 30.0


def add_security_drill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", default=[], metavar="WORD",
                        help="run only the attacks whose name contains WORD (repeat for more); "
                             f"names: {', '.join(sorted({a.group for a in ATTACKS}))}")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the stack's servers and logs go (default: a new directory under "
                             "<data dir>/security-drill)")


@dataclass
class Background:
    """A well-behaved client of tenant A chatting one request at a time, for as long as it runs."""
    url: str
    key: str
    served: int = 0
    failed: int = 0
    errors: Counter = field(default_factory=Counter)
    # Told to come back later (admission under load: `retry_after_s`), and did: not a failure, as
    # in the chaos drill; counted apart and printed.
    waited: Counter = field(default_factory=Counter)
    request_ids: set[str] = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            try:
                async with websockets.connect(self.url, additional_headers={"Authorization": f"Bearer {self.key}"},
                                              max_size=16 * 1024 * 1024) as ws:
                    while not stop.is_set():
                        n += 1
                        await self._one(ws, n)
            except Exception as exc:  # the connection itself failed: a failure the drill reports
                if stop.is_set():
                    return
                self._fail(type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _one(self, ws: websockets.ClientConnection, n: int) -> None:
        await ws.send(json.dumps({"type": "chat", "id": f"bg{n}", "max_tokens": BACKGROUND_MAX_TOKENS,
                                  "messages": [{"role": "user", "content": f"background question {n}"}]}))
        async with asyncio.timeout(BACKGROUND_TIMEOUT_S):
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("type") == "accepted":
                    self.request_ids.add(frame["request_id"])
                elif frame.get("type") == "done":
                    self.served += 1
                    return
                elif frame.get("type") == "error":
                    if frame.get("retry_after_s") and frame.get("id") == f"bg{n}":
                        self.waited[frame.get("code", "?")] += 1
                    else:
                        self._fail(frame.get("code", "?"))
                    await asyncio.sleep(float(frame.get("retry_after_s") or 0.5))
                    return

    def _fail(self, what: str) -> None:
        self.failed += 1
        self.errors[what] += 1


@dataclass
class Verdict:
    name: str
    refused: bool
    how: str
    others_served: bool

    def line(self) -> str:
        return (f"{self.name:<38} {'REFUSED' if self.refused else 'NOT REFUSED':<11} {self.how}"
                f"  | others served: {'yes' if self.others_served else 'NO'}")


async def attack_all(target: Target, background: Background, attacks: list[Attack]) -> list[Verdict]:
    verdicts = []
    for attack in attacks:
        served, failed = background.served, background.failed
        try:
            refused, how = await asyncio.wait_for(attack.run(target), attack.timeout_s)
        except Exception as exc:  # the drill could not tell: counted as not refused, with why
            refused, how = False, f"drill could not tell: {type(exc).__name__}: {str(exc)[:80]}"
        deadline = time.monotonic() + SERVED_WAIT_S
        while background.served <= served and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        verdict = Verdict(attack.name, refused, how, background.served > served and background.failed == failed)
        print(verdict.line(), flush=True)
        verdicts.append(verdict)
    return verdicts


def summary(verdicts: list[Verdict], background: Background) -> tuple[bool, str]:
    refused = sum(v.refused for v in verdicts)
    others = all(v.others_served for v in verdicts)
    ok = refused == len(verdicts) and others and background.failed == 0
    errors = f" (its errors: {dict(background.errors)})" if background.failed else ""
    return ok, (f"attacks refused {refused}/{len(verdicts)}; others served throughout: "
                f"{'yes' if others and not background.failed else 'NO'}; background client: "
                f"{background.served} served, {background.failed} failed{errors}"
                + (f", told to wait and served after {dict(background.waited)}" if background.waited else ""))


def selected(only: list[str]) -> list[Attack]:
    chosen = [a for a in ATTACKS if not only or any(w in a.name or w == a.group for w in only)]
    if not chosen:
        raise SystemExit(f"no attack matches {only}; groups: {', '.join(sorted({a.group for a in ATTACKS}))}")
    return chosen


def run_security_drill(settings: Settings, args: argparse.Namespace) -> int:
    attacks = selected(args.only)
    root = settings.stack.data_dir / "security-drill"
    root.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))
    workdir.mkdir(parents=True, exist_ok=True)
    keys_file = workdir / "api-keys.json"
    keys = {tenant: add_key(keys_file, tenant, [], 0) for tenant in TENANTS}
    cluster = SimCluster(settings.replace(api_keys_file=str(keys_file)), workdir,
                         prefill_workers=1, decode_workers=1, calibration_file=None)

    async def drill() -> bool:
        s = cluster.settings
        target = Target(settings=s, edge_host="127.0.0.1", keys=keys, workdir=workdir,
                        metrics_port=cluster.edge_metrics_port)
        background = Background(target.ws_url, keys[TENANTS[0]])
        target.background_ids = background.request_ids
        stop = asyncio.Event()
        chatting = asyncio.create_task(background.run(stop))
        try:
            deadline = time.monotonic() + SERVED_WAIT_S
            while background.served == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            # Until the edge has heard the workers it may say "unavailable": a start, not an attack.
            warmup = f" after {dict(background.errors)} while starting" if background.failed else ""
            background.failed, background.errors = 0, Counter()
            print(f"stack up: edge ws {target.ws_url}, api {target.api_url}; background client of "
                  f"{TENANTS[0]} served {background.served}{warmup}", flush=True)
            verdicts = await attack_all(target, background, attacks)
        finally:
            stop.set()
            chatting.cancel()
            await asyncio.gather(chatting, return_exceptions=True)
            await target.close()
        ok, line = summary(verdicts, background)
        print(line, flush=True)
        return ok

    return run_drill(cluster, workdir, "security drill: starting a stack", drill)


def main(argv: list[str] | None = None) -> int:
    from services import logs
    from services.settings import from_env

    parser = argparse.ArgumentParser(prog="grokstack drill security", description=__doc__.split("\n\n")[0])
    add_security_drill_arguments(parser)
    args = parser.parse_args(argv)
    settings = from_env()
    logs.configure("warning", settings.stack.log_format, process="security-drill")
    return run_security_drill(settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
