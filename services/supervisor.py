"""Starting, waiting for and stopping the processes a command runs: one supervisor for
`grokstack up`, the lab's benchmarks and drills, and the integration tests.

- Each child runs in a process group of its own (a worker's engine runs in child processes of the
  worker: the group is what is stopped or killed), its output in a log file of its own.
- A child is ready when its health endpoint answers 200 (a worker's /readyz on its metrics port,
  an edge's /readyz, vLLM's /health), never because of a line in its log: the log level can filter
  that line out, and then a start waits for nothing.
- While it waits, a child that exits fails the wait at once, naming the child and its log.
- Stopping a child sends SIGTERM to the child alone, waits up to its grace, then SIGKILLs its
  group (and any descendant that left the group). SIGTERM to the whole group would also reach the
  worker's engine, which aborts its requests at once (vLLM's engine core does on SIGTERM) instead
  of letting the worker drain them. Killing a child SIGKILLs its group at once, as a crash.
- Nothing is left behind. `stop_all` stops everything in reverse order of starting: children
  started one after another stop together (each drains within its own grace), and are gone before
  what was started before them (workers drain through the servers started first). `stop_on_signals`
  turns SIGTERM and SIGINT into an exception in the main thread, so every finally block runs.
  Every child gets the Linux parent-death signal (SIGKILL), and a keeper process SIGKILLs the
  groups a supervisor leaves when it dies: a SIGKILLed supervisor runs no code, and the
  parent-death signal reaches only its children, not their engines.
- A child that exits by itself can be started again as it was (`restart`, its log appended);
  `Restarter` does so for every child that exits, each after its own exponential `Backoff`
  (1 s, 2 s, 4 s ... 30 s, back to 1 s once it ran well for a minute), saying each time which
  child exited, with what code, after how long, and where its log is.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import psutil
import structlog

from services.settings import Settings, environment_of

logger = structlog.get_logger("grokstack.supervisor")

T = TypeVar("T")

DEFAULT_GRACE_S = 30.0
POLL_S = 0.25  # how often a wait asks the health endpoints
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


class StartFailed(RuntimeError):
    """A child exited while it was waited for, or was not ready in time; says which and where its log is."""


class Stopped(SystemExit):
    """SIGTERM or SIGINT reached a supervising command (see `stop_on_signals`). A SystemExit, so it
    passes `except Exception` and asyncio's loop untouched, and an uncaught one exits quietly with
    the shell's code for the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def child_environment(settings: Settings) -> dict[str, str]:
    """The supervisor's effective settings, handed down the one way processes read them."""
    # vLLM's own level is services/logs.py's (its start-up lines at info), in every process alike.
    return {**os.environ, **environment_of(settings)}


def local_host(host: str) -> str:
    """Where to reach a server of this machine listening on `host` (all addresses: loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def local_url(host: str, port: int, path: str) -> str:
    return f"http://{local_host(host)}:{port}{path}"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # health endpoints are local


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether `url` answers 200 now (503, a refused connection or a timeout: not yet)."""
    try:
        with _DIRECT.open(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, http.client.HTTPException):  # HTTPError is a URLError
        return False


# ---------------------------------------------------------------------- one process group

_launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervisor-launcher")


def _on_launcher(start: Callable[[], T]) -> T:
    """Run `start` on the one thread that starts every child. The kernel sends the parent-death
    signal when the *thread* that forked a child ends, so a child started from a short-lived
    thread (a timer, asyncio.to_thread) would die with that thread; this one lives as long as
    the process."""
    return _launcher.submit(start).result()


def _die_with(parent: int) -> Callable[[], None] | None:
    """preexec_fn: SIGKILL this child when its parent dies."""
    if _PRCTL is None:
        return None

    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before the line above: nothing would tell us
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


# The keeper reads "+<group>" and "-<group>" lines on its stdin. When the pipe closes (its
# supervisor died, however: the kernel closes the pipe even after a SIGKILL), it SIGKILLs the
# groups still listed and exits. Plain Python without site-packages: it starts in milliseconds.
KEEPER = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class _Keeper:
    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _tell(self, line: str) -> None:
        with self._lock:
            if self._proc is None:  # started on the launcher thread, in a session of its own
                self._proc = subprocess.Popen(
                    [sys.executable, "-S", "-c", KEEPER], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True, text=True)
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):  # it was killed: the parent-death signal still holds
                pass

    def watch(self, group: int) -> None:
        self._tell(f"+{group}")

    def forget(self, group: int) -> None:
        if self._proc is not None:
            self._tell(f"-{group}")


_keeper = _Keeper()


def spawn(argv: list[str], *, log: Path | None = None, env: Mapping[str, str] | None = None,
          cwd: Path | str | None = None, append: bool = False) -> subprocess.Popen:
    """Start `argv` as the leader of a new process group that dies with this process, its
    stdout and stderr to `log` (None: this process's own; `append` keeps what the file held)."""
    def start() -> subprocess.Popen:
        out = open(log, "ab" if append else "wb") if log is not None else None
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True, preexec_fn=_die_with(os.getpid()))
        finally:
            if out is not None:
                out.close()  # the child has its own copy
        _keeper.watch(proc.pid)
        return proc
    return _on_launcher(start)


def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _gone(process: psutil.Process) -> bool:
    """Exited: a zombie counts, as nobody may reap an orphan here (PID 1 of a container)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_tree(proc: subprocess.Popen, descendants: list[psutil.Process]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for process in descendants:  # also those that left the group
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    deadline = time.monotonic() + 5.0
    while not all(_gone(p) for p in descendants) and time.monotonic() < deadline:
        time.sleep(0.01)
    _keeper.forget(proc.pid)


def stop_group(proc: subprocess.Popen, grace_s: float, sig: int = signal.SIGTERM) -> bool:
    """`sig` to the process, up to `grace_s` for it to exit, then SIGKILL to its group and its
    descendants; whether it exited by itself in time."""
    descendants = _descendants(proc)
    stopped = True
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            stopped = False
    _kill_tree(proc, descendants)
    return stopped


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process, its group and its descendants at once: a crash, from outside."""
    _kill_tree(proc, _descendants(proc))


# ---------------------------------------------------------------------- the supervisor

@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path | None
    ready_url: str | None  # its health endpoint; None: ready while it runs
    grace_s: float  # how long a stop waits for it before killing its group
    # how it was started, to start it again as it was (`Supervisor.restart`)
    argv: list[str] = field(default_factory=list)
    env: Mapping[str, str] | None = None
    cwd: Path | str | None = None
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        return self.running and (self.ready_url is None or answers(self.ready_url))

    def exit_message(self, when: str) -> str:
        where = f"see {self.log}" if self.log else "its output is above"
        return f"{self.name} exited with code {self.proc.returncode} {when}; {where}"


@dataclass
class _Adopted:
    """Something started elsewhere (an embedded server) that is stopped in its place in the order."""
    name: str
    stop: Callable[[], None]


_stopping = 0  # supervisors stopping right now: a signal then changes nothing (see stop_on_signals)


class Supervisor:
    """The children one command runs, and what else it must stop with them, in starting order.
    Safe to use from several threads (chaos starts replacements from timers)."""

    def __init__(self) -> None:
        self._started: list[Child | _Adopted] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], *, log: Path | None = None, env: Mapping[str, str] | None = None,
              cwd: Path | str | None = None, ready_url: str | None = None,
              grace_s: float = DEFAULT_GRACE_S, append: bool = False) -> Child:
        """Start a child (see `spawn`); `ready_url` is where `wait_ready` asks whether it serves."""
        with self._lock:
            if any(c.name == name and c.running for c in self._children()):
                raise ValueError(f"a child named {name!r} is already running")
            self._started = [e for e in self._started if not (isinstance(e, Child) and e.name == name)]
            child = Child(name, spawn(argv, log=log, env=env, cwd=cwd, append=append), log, ready_url, grace_s,
                          list(argv), env, cwd)
            self._started.append(child)
        logger.debug("process started", child=name, pid=child.pid, log=str(log) if log else "console")
        return child

    def restart(self, name: str) -> Child:
        """Start a child that exited by itself again, as it was started (its log appended), in
        its place in the stopping order."""
        with self._lock:
            old = next((c for c in self._children() if c.name == name), None)
            if old is None:
                raise KeyError(name)
            if old.running:
                raise ValueError(f"{name!r} is still running")
            _keeper.forget(old.pid)
            child = Child(name, spawn(old.argv, log=old.log, env=old.env, cwd=old.cwd, append=True), old.log,
                          old.ready_url, old.grace_s, old.argv, old.env, old.cwd, restarts=old.restarts + 1)
            self._started[self._started.index(old)] = child
        logger.info("process restarted", child=name, pid=child.pid, restarts=child.restarts)
        return child

    def adopt(self, name: str, stop: Callable[[], None]) -> None:
        """Stop something started elsewhere in its place: after every child started later."""
        with self._lock:
            self._started.append(_Adopted(name, stop))

    def _children(self) -> list[Child]:
        return [e for e in self._started if isinstance(e, Child)]

    def children(self) -> list[Child]:
        """The children started here and not stopped or killed here, in starting order."""
        with self._lock:
            return self._children()

    def __getitem__(self, name: str) -> Child:
        for child in self.children():
            if child.name == name:
                return child
        raise KeyError(name)

    def exited(self) -> list[Child]:
        """Children that exited by themselves (none was stopped or killed here)."""
        return [c for c in self.children() if not c.running]

    def wait_ready(self, timeout_s: float, names: Iterable[str] | None = None) -> None:
        """Until every child named (default: all) answers on its health endpoint. Raises
        StartFailed at once when any child exits, or when time is up."""
        waiting = list(names) if names is not None else [c.name for c in self.children()]
        deadline = time.monotonic() + timeout_s
        while True:
            for child in self.exited():
                raise StartFailed(child.exit_message("while starting"))
            waiting = [name for name in waiting if not self[name].ready()]
            if not waiting:
                return
            if time.monotonic() > deadline:
                late = [self[name] for name in waiting]
                raise StartFailed(f"not ready after {timeout_s:.0f} s: " + "; ".join(
                    f"{c.name} ({c.ready_url}{f', see {c.log}' if c.log else ''})" for c in late))
            time.sleep(POLL_S)

    def _take(self, name: str) -> Child:
        child = self[name]
        with self._lock:
            self._started.remove(child)
        return child

    def stop(self, name: str) -> None:
        """SIGTERM to it, up to its grace, then SIGKILL to its group."""
        self._stop_child(self._take(name))

    def kill(self, name: str) -> None:
        """SIGKILL its group at once, as a crash."""
        child = self._take(name)
        kill_group(child.proc)
        logger.debug("process killed", child=child.name, pid=child.pid)

    def _stop_child(self, child: Child) -> None:
        if not stop_group(child.proc, child.grace_s):
            logger.warning("process did not stop in time; killed its group", child=child.name, grace_s=child.grace_s)

    def stop_all(self) -> None:
        """Everything started or adopted here, newest first. The children started one after another
        stop together (each drains within its own grace, as one SIGTERM to all of them would let
        them), and all of them are gone before what was adopted before them (the servers they
        drain through) stops."""
        global _stopping
        _stopping += 1
        failures: list[Exception] = []
        try:
            while batch := self._pop_batch():
                try:
                    if isinstance(batch[0], _Adopted):
                        batch[0].stop()
                    else:
                        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
                            list(pool.map(self._stop_child, batch))  # type: ignore[arg-type]
                except Exception as exc:  # stop the rest all the same; raise once they are stopped
                    logger.error("could not stop", children=[item.name for item in batch],
                                 error=f"{type(exc).__name__}: {exc}")
                    failures.append(exc)
        finally:
            _stopping -= 1
        if failures:
            raise failures[0]

    def _pop_batch(self) -> list[Child | _Adopted]:
        """The newest item, with the children started just before it when it is a child."""
        with self._lock:
            if not self._started:
                return []
            batch = [self._started.pop()]
            while isinstance(batch[0], Child) and self._started and isinstance(self._started[-1], Child):
                batch.append(self._started.pop())
            return batch


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Stopped` in the main thread, so a supervising
    command stops what it started through its finally blocks. Once: a signal while it is already
    stopping is ignored, as it would cut the stop short (children are killed after their grace
    anyway). Outside the main thread, where Python delivers no signal, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal raised
        if raised or _stopping:  # (no logging here: the main thread may hold the logger's lock)
            return
        raised = True
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------- restarts


@dataclass
class Backoff:
    """How long to wait before starting again a child that exited: `initial_s`, doubling at each
    exit up to `cap_s`, and `initial_s` again after a run of at least `reset_after_s` (it had
    recovered; this exit is a new trouble)."""
    initial_s: float = 1.0
    cap_s: float = 30.0
    reset_after_s: float = 60.0
    exits: int = 0  # exits in a row, each after a short run

    def delay(self, ran_s: float) -> float:
        """The wait before the next start, after an exit that followed a run of `ran_s`."""
        if ran_s >= self.reset_after_s:
            self.exits = 0
        delay = min(self.cap_s, self.initial_s * 2 ** self.exits)
        self.exits += 1
        return delay


class Restarter:
    """Starts again every child of `supervisor` that exits by itself, each after its own backoff,
    while the others keep running. Call `step` periodically (it never blocks); `before_restart`
    runs just before a child starts again (e.g. to clear what the last run reported)."""

    def __init__(self, supervisor: Supervisor, backoff: Callable[[], Backoff] = Backoff,
                 before_restart: Callable[[Child], None] | None = None) -> None:
        self.supervisor = supervisor
        self._backoff = backoff
        self._before = before_restart
        self._backoffs: dict[str, Backoff] = {}
        self._due: dict[str, float] = {}  # child name -> monotonic time of its restart

    def step(self) -> list[Child]:
        """Schedule the children that exited since the last step; restart those due. Returns the
        children started now."""
        now = time.monotonic()
        for child in self.supervisor.exited():
            if child.name in self._due:
                continue
            ran_s = now - child.started_at
            delay = self._backoffs.setdefault(child.name, self._backoff()).delay(ran_s)
            self._due[child.name] = now + delay
            logger.error("process exited; restarting it", child=child.name, code=child.proc.returncode,
                         ran_s=round(ran_s, 1), restart_in_s=delay, restarts_so_far=child.restarts,
                         log=str(child.log) if child.log else "above")
        started = []
        for name, due in list(self._due.items()):
            if now < due:
                continue
            del self._due[name]
            try:
                child = self.supervisor[name]
            except KeyError:  # stopped meanwhile
                continue
            if self._before is not None:
                self._before(child)
            started.append(self.supervisor.restart(name))
        return started
