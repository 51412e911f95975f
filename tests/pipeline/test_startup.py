"""Processes that cannot reach NATS or Redis at start say so, with the URL, and exit non-zero."""

import subprocess
import sys

from services.embedded import free_port


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_edge_without_nats_exits_naming_the_url():
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_cli("edge", "--nats-url", url)
    assert result.returncode != 0
    assert f"cannot connect to NATS at {url}" in result.stderr


def test_worker_without_redis_exits_naming_the_url(nats_url, nats_credentials):
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli("prefill", "--nats-url", nats_url, "--nats-credentials", nats_credentials,
                     "--redis-url", url)
    assert result.returncode != 0
    assert f"cannot connect to Redis at {url}" in result.stderr


def test_worker_without_any_nats_url_explains_how_to_get_one():
    result = subprocess.run([sys.executable, "-m", "services.cli", "decode"], capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "NATS_URL is not set" in result.stderr


def test_a_region_that_would_break_subject_names_is_refused(nats_url):
    result = run_cli("edge", "--nats-url", nats_url, "--region", "eu.west")
    assert result.returncode == 2 and "GROKSTACK_REGION (--region)" in result.stderr and "'eu.west'" in result.stderr


async def test_a_worker_reports_the_metrics_port_it_bound_for_its_supervisor(settings, tmp_path):
    """`grokstack up` picks no port in advance: the worker binds a free one and writes it in the
    ports file the supervisor named (GROKSTACK_PORTS_FILE), where `up` waits for it. It does so
    before its engine loads (a minute or more): meanwhile it is alive, and not ready."""
    import asyncio

    from services import telemetry
    from services.lab.fake_engine import FakeEngine
    from services.processes import start_worker
    from services.supervisor import answers

    class SlowStart(FakeEngine):
        loading = asyncio.Event()

        async def start(self) -> None:
            await self.loading.wait()

    report = tmp_path / "decode.json"
    engine = SlowStart("decode")
    starting = asyncio.create_task(start_worker(settings.replace(ports_file=str(report), metrics_port=0),
                                                "decode", engine))
    for _ in range(600):
        if telemetry.read_ports(report) is not None or starting.done():
            break
        await asyncio.sleep(0.05)
    reported = telemetry.read_ports(report)
    if reported is None:
        starting.cancel()
        raise AssertionError("no metrics port reported while the engine loads")
    port = reported["metrics_port"]
    assert port != 0
    assert await asyncio.to_thread(answers, f"http://127.0.0.1:{port}/healthz")
    assert not await asyncio.to_thread(answers, f"http://127.0.0.1:{port}/readyz")
    engine.loading.set()
    running = await asyncio.wait_for(starting, 30)
    try:
        assert running.metrics_port == port
        for _ in range(200):  # ready once its pull loop runs
            if await asyncio.to_thread(answers, f"http://127.0.0.1:{port}/readyz"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("not ready after its engine started")
    finally:
        await running.stop(1.0)
