"""How `grokstack up` supervises its processes (services/up.py), with real child processes: each
binds its own metrics port (0: a free one) and reports it in its ports file, `up` waits for the
report before it asks the child's /readyz there, and a child that dies is started again after its
backoff and found on the port it reports then (never on the one its last run reported)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.settings import ENV
from services.supervisor import Backoff, StartFailed, Supervisor, answers
from services.up import StackWatch, await_reports, reported_metrics_port
from tests.conftest import REPO

# A worker stand-in: serves /readyz on a free port, then reports the port as a worker does.
CHILD = r'''
import http.server, os, sys, threading, time
from services import telemetry
if "--exit" in sys.argv:
    sys.exit(5)

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
threading.Thread(target=server.serve_forever, daemon=True).start()
telemetry.report_ports(os.environ["GROKSTACK_PORTS_FILE"], metrics_port=server.server_port)
while True:
    time.sleep(1)
'''


@pytest.fixture
def start(tmp_path: Path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def start_child(supervisor: Supervisor, name: str, *args: str):
        env = {**os.environ, "PYTHONPATH": str(REPO), ENV["ports_file"]: str(tmp_path / f"{name}.json"),
               ENV["edge_host"]: "127.0.0.1"}
        return supervisor.start(name, [sys.executable, str(script), *args], env=env, cwd=REPO,
                                log=tmp_path / f"{name}.log")
    return start_child


def eventually(check, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_up_waits_for_the_port_a_child_bound_and_finds_it_again_after_a_restart(start):
    with Supervisor() as supervisor:
        child = start(supervisor, "worker")
        ports = await_reports(supervisor, ["worker"], timeout_s=60)
        assert child.ready_url == f"http://127.0.0.1:{ports['worker']}/readyz"
        supervisor.wait_ready(30)
        other = start(supervisor, "other")
        await_reports(supervisor, ["other"], timeout_s=60)

        watch = StackWatch(supervisor, {"worker", "other"}, backoff=lambda: Backoff(initial_s=0.2))
        os.kill(child.pid, signal.SIGKILL)
        assert eventually(lambda: not child.running)

        def back() -> bool:
            watch.step()
            again = supervisor["worker"]
            return again.restarts == 1 and "worker" not in watch.unreported
        assert eventually(back)
        again = supervisor["worker"]
        assert again.ready_url == f"http://127.0.0.1:{reported_metrics_port(again)}/readyz"
        assert eventually(lambda: answers(again.ready_url))  # type: ignore[arg-type]
        supervisor.wait_ready(30)
        assert other.running and supervisor["other"].restarts == 0  # the rest kept running


def test_a_child_that_exits_before_it_reports_fails_the_start_naming_it(start, tmp_path):
    with Supervisor() as supervisor:
        start(supervisor, "worker", "--exit")
        with pytest.raises(StartFailed, match="worker exited with code 5 while starting"):
            await_reports(supervisor, ["worker"], timeout_s=60)


def test_decode_yields_the_cores_only_while_prefill_computes_every_prompt():
    from services.settings import Settings
    from services.up import role_environment
    nice = ENV["cpu_nice"]
    shared = Settings(engine_step_lock="/tmp/x.lock")  # short prompts ride with decode (the default)
    assert nice not in role_environment({}, shared, "decode")
    every_prompt_to_prefill = shared.replace(decode_prefill_max_tokens=0)
    assert role_environment({}, every_prompt_to_prefill, "decode")[nice] == "5"
    assert nice not in role_environment({}, every_prompt_to_prefill, "prefill")
    assert nice not in role_environment({}, Settings(decode_prefill_max_tokens=0), "decode")  # own cores
