"""Engines sharing the cores take turns: the one that just ran waits for the one already waiting."""

from __future__ import annotations

import threading
import time

from kv_store.step_lock import StepLock


def test_a_waiting_engine_gets_the_next_turn_before_the_one_that_just_released(tmp_path):
    path = str(tmp_path / "step.lock")
    a, b = StepLock(path), StepLock(path)  # separate open files, as in two engine processes
    order: list[str] = []
    b_started = threading.Event()

    def engine_b() -> None:
        b_started.set()
        b.acquire()
        order.append("b")
        b.release()

    a.acquire()
    order.append("a1")
    thread = threading.Thread(target=engine_b)
    thread.start()
    b_started.wait()
    time.sleep(1.0)  # b is now blocked on the lock a holds
    a.release()
    a.acquire()  # straight back, as a busy engine does
    order.append("a2")
    a.release()
    thread.join(5)
    assert order == ["a1", "b", "a2"]


def test_a_vllm_process_waiting_for_the_next_step_sleeps_instead_of_spinning(monkeypatch):
    """vLLM's shared-memory queue reader spins for a second after each message; on a shared CPU
    that spinning takes the cores from the other engine's forward pass."""
    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    from kv_store.step_lock import wait_without_spinning

    context = zmq.Context()
    writer = SpinCondition(is_reader=False, context=context, notify_address="inproc://step-notify")
    reader = SpinCondition(is_reader=True, context=context, notify_address="inproc://step-notify")
    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)  # the patch below ends with the test
    monkeypatch.setattr(SpinCondition, "_grokstack_sleeps", False, raising=False)
    wait_without_spinning()
    used: list[float] = []

    def waiting_reader() -> None:  # as acquire_read does while the step is not written yet
        reader.record_read()
        start, cpu = time.monotonic(), time.thread_time()
        while time.monotonic() - start < 0.5:
            reader.wait()
        used.append(time.thread_time() - cpu)

    thread = threading.Thread(target=waiting_reader)
    thread.start()
    thread.join(5)
    writer.local_notify_socket.close()
    reader.local_notify_socket.close()
    # spinning, the reader takes about the whole half second of a core; sleeping, a few per cent
    assert used and used[0] < 0.1, f"the waiting reader used {used} s of CPU in 0.5 s"


def test_a_waiting_vllm_process_wakes_about_a_hundred_times_in_a_forward_pass(monkeypatch):
    """Each wake-up takes a core from the other engine's forward pass (its OpenMP team then waits
    for the preempted thread): over a 170 ms wait a reader looks at its queue at most ~120 times
    (naps of 0.5 ms, then 5% of the wait); with the old naps (50 us, then 1%) it was about 450.
    The clock is the naps' own (each nap moves it on by exactly its length): no machine's speed in it."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    from kv_store import step_lock

    class NapClock:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = NapClock()
    monkeypatch.setattr(step_lock, "time", clock)
    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)
    monkeypatch.setattr(SpinCondition, "_grokstack_sleeps", False, raising=False)
    step_lock.wait_without_spinning()
    reader = SpinCondition.__new__(SpinCondition)  # only last_read is read by the patched wait
    reader.last_read = 1
    looks = 0
    while clock.now < 0.17:
        reader.wait()
        looks += 1
    assert 10 < looks <= 130, looks
