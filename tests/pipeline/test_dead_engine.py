"""A worker whose engine dies for good (vLLM's engine core crashed: here the fake engine's
`die()`, which fails every call as VllmEngine does) while it holds a request: it stops pulling,
hands the job back at once (served by another worker, nothing dead-lettered), says `failed` in
its heartbeat and on /healthz, and its run ends with EXIT_ENGINE_DEAD. A worker whose event loop
stalls fails /healthz, then its process exits with EXIT_LOOP_STALLED. Real NATS and Redis."""

from __future__ import annotations

import asyncio
import sys
import urllib.error
import urllib.request

import pytest

from bus.codec import decode
from bus.messages import Heartbeat
from edge.client import EdgeClient
from inference import metrics
from inference.worker import EXIT_ENGINE_DEAD, EXIT_LOOP_STALLED
from services import telemetry
from services.processes import serve_worker
from services.supervisor import child_environment
from tests.conftest import REPO
from tests.pipeline.harness import bus_client, eventually, running_stack
from tests.pipeline.test_chat_flow import expected
from tests.pipeline.test_process_faults import QUESTION, fake, spare


def jobs(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("grokstack_jobs_total", {"role": "decode", "outcome": outcome}) or 0.0


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_worker_whose_engine_dies_hands_its_job_over_and_exits(settings):
    settings = settings.replace(ack_wait_s=2.0)
    dying = fake(settings, "decode", delay=0.05)
    async with running_stack(settings, fake(settings, "prefill"), dying) as stack, bus_client(settings) as nc:
        beats: list[Heartbeat] = []

        async def heard(msg) -> None:
            beat = decode(msg.data, Heartbeat)
            if beat.worker_id == settings.bus.worker_name:
                beats.append(beat)
        await nc.subscribe(stack.subjects.heartbeat(settings.bus.region, "decode"), cb=heard)
        victim = stack.decode
        assert healthz(victim.metrics_port) == 200
        exit_code: list[int] = []
        failed_before, handed_before = jobs("failed"), jobs("handed_over")

        async def serve() -> None:  # what run_worker does once the worker serves
            with pytest.raises(SystemExit) as exited:
                await serve_worker(settings, victim, asyncio.Event())
            exit_code.append(exited.value.code)
        serving = asyncio.create_task(serve())
        async with await EdgeClient.connect(stack.url) as client:
            answer = asyncio.create_task(client.complete([{"role": "user", "content": QUESTION}], max_tokens=300))
            assert await eventually(lambda: victim.worker._active)
            other = await spare(settings, "decode", fake(settings, "decode"))
            try:
                dying.die("engine core killed by the test")
                result = await asyncio.wait_for(answer, 30)
                await asyncio.wait_for(serving, 30)
                # it pulls nothing more: a later request goes to the other worker
                later = await asyncio.wait_for(
                    client.complete([{"role": "user", "content": "a later one"}], max_tokens=50), 30)
                assert await eventually(lambda: any(b.state == "failed" for b in beats))
                dlq = await nc.jetstream().stream_info(stack.subjects.stream("dlq", settings.bus.region))
                assert dlq.state.messages == 0, "a job was dead-lettered"
            finally:
                await other.stop(1.0)
    assert result.done, result.error
    assert result.text == expected(QUESTION)
    assert later.text == expected("a later one")
    assert other.worker.counters.served == 2  # the handed-over answer and the later one
    assert dying.started == 1
    assert victim.worker.counters.failed == 0
    # handed back as not its fault (a nak at once), not failed (a nak with backoff, and on its
    # last delivery a dead letter)
    assert (jobs("failed") - failed_before, jobs("handed_over") - handed_before) == (0, 1)
    assert exit_code == [EXIT_ENGINE_DEAD]
    failed = next(b for b in beats if b.state == "failed")
    assert "engine core killed by the test" in failed.reason
    ok, body = victim.health()
    assert not ok and "engine core killed" in body, body


async def test_a_stalled_loop_fails_liveness_and_then_ends_the_process(settings, tmp_path):
    """The loop ticks every second while the worker serves; /healthz (answered by the metrics
    thread) fails once it has not for worker_loop_stall_s, and the watchdog thread ends the
    process with EXIT_LOOP_STALLED at 3 times that, so its jobs move on as after a crash."""
    script = tmp_path / "stalling_worker.py"
    script.write_text(STALLING_WORKER)
    child_settings = settings.replace(worker_loop_stall_s=1.0, ports_file=str(tmp_path / "ports.json"))
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:  # a file: a full pipe would block the watchdog's last words
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), env=child_environment(child_settings), cwd=str(REPO),
            stdout=out, stderr=asyncio.subprocess.STDOUT)
    try:
        assert await eventually(lambda: telemetry.read_ports(tmp_path / "ports.json"), timeout=60)
        port = telemetry.read_ports(tmp_path / "ports.json")["metrics_port"]  # type: ignore[index]
        assert await eventually(lambda: (tmp_path / "serving").exists(), timeout=60)
        assert await asyncio.to_thread(healthz, port) == 200  # serving, ticking
        (tmp_path / "stall").touch()  # the worker's loop blocks from now on
        statuses: list[int] = []

        async def unhealthy() -> bool:
            status = await asyncio.to_thread(healthz_or_gone, port)
            statuses.append(status)
            return status == 503
        assert await eventually(unhealthy, timeout=60), statuses
        code = await asyncio.wait_for(proc.wait(), 120)
        output = log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == EXIT_LOOP_STALLED, output
    assert "event loop stalled" in output


def healthz_or_gone(port: int) -> int:
    try:
        return healthz(port)
    except OSError:
        return 0


# A worker process with a fake engine whose loop blocks for good once <dir>/stall exists.
STALLING_WORKER = r'''
import asyncio, sys, time
from pathlib import Path
from services.lab.fake_engine import FakeEngine
from services.processes import serve_worker, start_worker
from services.provision import provision
from services.settings import from_env

here = Path(__file__).parent

async def main():
    settings = from_env()
    await provision(settings)
    running = await start_worker(settings, "decode", FakeEngine("decode"))

    async def stall():
        while not (here / "stall").exists():
            await asyncio.sleep(0.05)
        time.sleep(3600)  # blocks the loop, as a hung native call would
    asyncio.get_running_loop().create_task(stall())
    (here / "serving").touch()
    await serve_worker(settings, running, asyncio.Event())

asyncio.run(main())
'''
