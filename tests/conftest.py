"""Real servers for the whole suite: nats-server with JetStream and a Redis-compatible server,
each started once on free ports. Tests isolate themselves with their own subject prefix.

Both enforce the stack's access model (services/embedded.py): every NATS connection logs in as
a role (`settings.bus.nats_credentials`; test helpers that act as operators use "ops"), and the
Redis URL carries the stack's user and password."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from pathlib import Path

import pytest
import structlog

from services.embedded import EmbeddedNats, EmbeddedRedis
from services.provision import provision_now
from services.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedNats:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def nats_credentials(nats_server: EmbeddedNats) -> str:
    """The role logins of the session's server (Settings.nats_credentials)."""
    return str(nats_server.credentials_file)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedRedis:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), maxmemory="1gb")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


def _dump_tasks(_signum, _frame) -> None:
    """`kill -USR1 <pytest pid>` writes every asyncio task's stack to /tmp/grokstack-tasks-<pid>.txt
    (pytest captures the standard streams): what a hung test waits for."""
    loop = asyncio._get_running_loop()  # the signal lands in the main thread, inside the loop
    with open(f"/tmp/grokstack-tasks-{os.getpid()}.txt", "w") as out:
        for task in asyncio.all_tasks(loop) if loop else []:
            print(f"{task!r}", file=out)
            coro = task.get_coro()
            while coro is not None:  # down the chain of awaits, where print_stack stops
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                if frame is not None:
                    print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}", file=out)
                coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


signal.signal(signal.SIGUSR1, _dump_tasks)

# The stacks that tests run in this process log through structlog, whose default prints to stdout:
# between a terminal chat's tokens, which tests read from stdout. Through the standard library
# instead, where pytest captures them per test and shows them with a failure (WARNING and above).
structlog.configure(
    processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.dev.ConsoleRenderer(colors=False)],
    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    logger_factory=structlog.stdlib.LoggerFactory(),
)


def unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


def provisioned(settings: Settings) -> Settings:
    """`settings` with its region's streams made (services/provision.py), as `grokstack provision`
    does before a stack starts: runtime roles only wait for them."""
    provision_now(settings)
    return settings


@pytest.fixture
def settings(nats_url: str, nats_credentials: str, redis_url: str) -> Settings:
    """Settings for one test: its own subjects, streams and KV keys on the shared servers, the
    streams provisioned."""
    prefix = unique_prefix()
    return provisioned(Settings(
        nats_url=nats_url, nats_credentials=nats_credentials, redis_url=redis_url,
        subject_prefix=prefix, kv_key_prefix=f"gskv:{prefix}",
        edge_port=0, api_port=0, heartbeat_s=0.2, worker_id=f"w-{prefix}", data_dir=REPO / ".data",
        ack_wait_s=10.0, max_deliver=3, drain_timeout_s=2.0, work_stream_mb=16,
        dead_letter_stream_mb=8, capture_max_mb=16))
