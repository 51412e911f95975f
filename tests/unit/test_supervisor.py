"""The supervisor (services/supervisor.py) with real child processes: small Python scripts that
answer a health endpoint after a delay, exit early, or start a grandchild. Readiness comes from
the endpoint, never from the log; a child that exits is reported at once, by name; stop and kill
take the whole process group; a child that exits is started again after a growing backoff while
the others keep running; and a supervising process that is SIGTERMed, or even SIGKILLed, leaves
no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from services.embedded import free_port
from services.supervisor import Backoff, Restarter, StartFailed, Supervisor, answers
from tests.conftest import REPO

# One script plays every child: it answers GET on --port with 503 until --ready-after seconds,
# then 200; prints the line a log-reading supervisor used to wait for at once; may exit early,
# start a grandchild (itself again, without a port), or ignore SIGTERM. Each process of it
# touches <marks>/term-<pid> when it gets SIGTERM.
CHILD = r'''
import argparse, http.server, os, signal, subprocess, sys, threading, time
p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=0)
p.add_argument("--ready-after", type=float, default=0.0)
p.add_argument("--exit-after", type=float, default=None)
p.add_argument("--grandchild", action="store_true")
p.add_argument("--ignore-term", action="store_true")
p.add_argument("--marks", default=".")
a = p.parse_args()
started = time.monotonic()

def on_term(*_):
    open(os.path.join(a.marks, f"term-{os.getpid()}"), "w").close()
    if not a.ignore_term:
        os._exit(0)

signal.signal(signal.SIGTERM, on_term)
print("worker serving", flush=True)
if a.grandchild:
    grandchild = subprocess.Popen([sys.executable, __file__, "--marks", a.marks])
    print(f"grandchild {grandchild.pid}", flush=True)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = time.monotonic() - started >= a.ready_after
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(b"ready\n" if ok else b"starting\n")

    def log_message(self, *args):
        pass

if a.port:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
if a.exit_after is not None:
    time.sleep(a.exit_after)
    sys.exit(3)
while True:
    time.sleep(1)
'''

# A supervising command: two children with a grandchild each, their pids in <marks>/pids, then
# it waits to be stopped; its finally block leaves a mark.
SUPERVISING = r'''
import sys, time
from pathlib import Path
from services.supervisor import Supervisor, stop_on_signals
child, marks = sys.argv[1], Path(sys.argv[2])
with stop_on_signals():
    try:
        with Supervisor() as supervisor:
            for name in ("a", "b"):
                supervisor.start(name, [sys.executable, child, "--grandchild", "--marks", str(marks)],
                                 log=marks / f"{name}.log", grace_s=10)
            (marks / "pids.tmp").write_text(" ".join(str(c.pid) for c in supervisor.children()))
            (marks / "pids.tmp").rename(marks / "pids")  # whole, or not yet
            while True:
                time.sleep(1)
    finally:
        (marks / "finally").touch()
'''


@pytest.fixture
def child(tmp_path: Path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def argv(*args: str) -> list[str]:
        return [sys.executable, str(script), "--marks", str(tmp_path), *args]
    return argv


def gone(pid: int) -> bool:
    """Exited (a zombie too: an orphan's new parent here may never reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def eventually(check, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def grandchild_of(log: Path) -> int:
    """The grandchild's pid, once it too says it serves (its SIGTERM handler is in place)."""
    assert eventually(lambda: log.read_text().count("worker serving") == 2), log.read_text()
    return int(log.read_text().split("grandchild ")[1].split()[0])


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_a_child_is_ready_when_its_endpoint_answers_200_not_when_its_log_says_so(child, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/readyz"
    log = tmp_path / "slow.log"
    with Supervisor() as supervisor:
        started = time.monotonic()
        worker = supervisor.start("slow", child("--port", str(port), "--ready-after", "3"), log=log, ready_url=url)
        # it says "worker serving" in its log, and its endpoint answers 503: not ready
        assert eventually(lambda: "worker serving" in log.read_text() and status(url) == 503)
        assert not worker.ready()
        supervisor.wait_ready(30)
        assert time.monotonic() - started >= 3
        assert worker.ready() and answers(url)


def test_a_child_that_exits_while_waited_for_fails_the_wait_at_once_naming_it_and_its_log(child, tmp_path):
    with Supervisor() as supervisor:
        supervisor.start("never-ready", child("--port", str(free_port()), "--ready-after", "3600"),
                         ready_url="http://127.0.0.1:1/readyz")
        supervisor.start("crashes", child("--exit-after", "0.3"), log=tmp_path / "crashes.log",
                         ready_url="http://127.0.0.1:1/readyz")
        started = time.monotonic()
        with pytest.raises(StartFailed) as failure:
            supervisor.wait_ready(60)
        assert time.monotonic() - started < 10
    assert str(failure.value) == f"crashes exited with code 3 while starting; see {tmp_path / 'crashes.log'}"


def test_a_child_not_ready_in_time_is_named_with_its_endpoint(child):
    url = f"http://127.0.0.1:{free_port()}/readyz"
    with Supervisor() as supervisor:
        supervisor.start("late", child(), ready_url=url)
        with pytest.raises(StartFailed, match=f"not ready after 1 s: late \\({url}\\)"):
            supervisor.wait_ready(1)


def test_stop_signals_the_child_then_kills_its_whole_group(child, tmp_path):
    with Supervisor() as supervisor:
        worker = supervisor.start("worker", child("--grandchild"), log=tmp_path / "worker.log")
        grandchild = grandchild_of(tmp_path / "worker.log")
        supervisor.stop("worker")
        assert gone(worker.pid) and gone(grandchild)
        assert (tmp_path / f"term-{worker.pid}").exists()  # it was asked first, and could drain
        # only the child is asked: a worker's engine must not abort its requests before it drains
        assert not (tmp_path / f"term-{grandchild}").exists()
        assert supervisor.children() == []


def test_a_child_that_ignores_sigterm_is_killed_with_its_group_after_its_grace(child, tmp_path):
    with Supervisor() as supervisor:
        worker = supervisor.start("stubborn", child("--grandchild", "--ignore-term"), log=tmp_path / "s.log",
                                  grace_s=0.5)
        grandchild = grandchild_of(tmp_path / "s.log")
        started = time.monotonic()
        supervisor.stop("stubborn")
        assert time.monotonic() - started >= 0.5
        assert (tmp_path / f"term-{worker.pid}").exists() and gone(worker.pid) and gone(grandchild)


def test_kill_takes_the_whole_group_at_once_as_a_crash(child, tmp_path):
    with Supervisor() as supervisor:
        worker = supervisor.start("victim", child("--grandchild"), log=tmp_path / "victim.log")
        grandchild = grandchild_of(tmp_path / "victim.log")
        supervisor.kill("victim")
        assert gone(worker.pid) and gone(grandchild)
        assert not list(tmp_path.glob("term-*"))  # no goodbye: SIGKILL only


def test_everything_stops_in_reverse_order_of_starting_adopted_things_too(child):
    stopped: list[str] = []
    supervisor = Supervisor()
    supervisor.adopt("server", lambda: stopped.append(f"server (worker running: {worker.running})"))
    worker = supervisor.start("worker", child())
    supervisor.adopt("late", lambda: stopped.append("late"))
    supervisor.stop_all()
    assert stopped == ["late", "server (worker running: False)"]
    assert not worker.running and supervisor.children() == []


def test_children_started_together_stop_together_each_within_its_grace(child, tmp_path):
    """`grokstack up`'s workers drain at the same time, as one SIGTERM to all would let them, not
    one grace after another."""
    supervisor = Supervisor()
    ports = [free_port(), free_port()]
    slow = [supervisor.start(name, child("--ignore-term", "--port", str(port)), grace_s=60,
                             ready_url=f"http://127.0.0.1:{port}/")
            for name, port in zip(("prefill", "decode"), ports, strict=True)]
    supervisor.wait_ready(30)  # serving: their SIGTERM handler is in place
    stopping = threading.Thread(target=supervisor.stop_all)
    stopping.start()
    marks = [tmp_path / f"term-{c.pid}" for c in slow]
    deadline = time.monotonic() + 15  # a guard: stopped one after another, the second waits 60 s
    while not all(m.exists() for m in marks) and time.monotonic() < deadline:
        time.sleep(0.05)
    both_asked = all(m.exists() for m in marks)
    for c in slow:  # end their grace now: they ignore SIGTERM
        os.kill(c.pid, signal.SIGKILL)
    stopping.join()
    assert both_asked


def test_a_child_started_from_a_short_lived_thread_outlives_the_thread(child):
    """The parent-death signal follows the thread that forked a child: chaos starts replacements
    from timer threads, which end at once."""
    with Supervisor() as supervisor:
        thread = threading.Thread(target=supervisor.start, args=("from-a-thread", child()))
        thread.start()
        thread.join()
        time.sleep(0.5)
        assert supervisor["from-a-thread"].running


def supervising(tmp_path: Path) -> tuple[subprocess.Popen, list[int], list[int]]:
    """A supervising process, its children's and their grandchildren's pids."""
    script = tmp_path / "supervising.py"
    script.write_text(SUPERVISING)
    child_script = tmp_path / "child.py"
    child_script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(child_script), str(tmp_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    pids = tmp_path / "pids"
    assert eventually(pids.exists, 30), "the supervising process did not start its children"
    children = [int(pid) for pid in pids.read_text().split()]
    grandchildren = [grandchild_of(tmp_path / f"{name}.log") for name in ("a", "b")]
    assert not any(gone(pid) for pid in children + grandchildren)
    return proc, children, grandchildren


def test_a_sigtermed_supervisor_stops_its_children_and_runs_its_finally_blocks(tmp_path):
    proc, children, grandchildren = supervising(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert (tmp_path / "finally").exists()
    assert all((tmp_path / f"term-{pid}").exists() for pid in children)  # stopped, not just killed
    assert all(gone(pid) for pid in children + grandchildren)


def test_a_sigkilled_supervisor_leaves_no_process_behind(tmp_path):
    proc, children, grandchildren = supervising(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert eventually(lambda: all(gone(pid) for pid in children + grandchildren)), \
        [pid for pid in children + grandchildren if not gone(pid)]
    assert not (tmp_path / "finally").exists()  # it could run nothing: the kernel and the keeper did it


def test_the_restart_backoff_doubles_up_to_its_cap_and_starts_over_after_a_good_run():
    backoff = Backoff(initial_s=1.0, cap_s=30.0, reset_after_s=60.0)
    assert [backoff.delay(ran_s=2.0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(ran_s=61.0) == 1  # it had recovered: a new trouble starts over
    assert backoff.delay(ran_s=0.5) == 2


def test_a_killed_child_comes_back_after_its_backoff_and_the_others_keep_running(child, tmp_path):
    log = tmp_path / "victim.log"
    with Supervisor() as supervisor:
        victim = supervisor.start("victim", child(), log=log)
        other = supervisor.start("other", child())
        restarter = Restarter(supervisor, backoff=lambda: Backoff(initial_s=0.5))
        assert eventually(lambda: "worker serving" in log.read_text())
        assert restarter.step() == []
        os.kill(victim.pid, signal.SIGKILL)
        assert eventually(lambda: not victim.running)
        restarted: list = []
        assert eventually(lambda: bool(restarted.extend(restarter.step()) or restarted))
        assert [c.name for c in restarted] == ["victim"]
        back = supervisor["victim"]
        assert back.running and back.pid != victim.pid and back.restarts == 1
        assert other.running and supervisor["other"] is other
        assert eventually(lambda: log.read_text().count("worker serving") == 2)  # the log goes on, appended


def test_a_child_that_keeps_crashing_at_start_waits_longer_each_time(child):
    with Supervisor() as supervisor:
        supervisor.start("crasher", child("--exit-after", "0"))
        restarter = Restarter(supervisor, backoff=lambda: Backoff(initial_s=0.2, cap_s=0.8))
        starts = [time.monotonic()]
        while supervisor["crasher"].restarts < 4:
            if restarter.step():
                starts.append(time.monotonic())
            time.sleep(0.02)
        waits = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        # each wait is at least its backoff (plus the run before the exit): 0.2, 0.4, 0.8, 0.8
        assert all(wait >= least for wait, least in zip(waits, [0.2, 0.4, 0.8, 0.8], strict=True)), waits
