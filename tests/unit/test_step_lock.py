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
