"""The chaos drill's clients and report (services/lab/chaos.py): how long a client waits before
asking again, what counts as a refusal, and how long each priority was refused after a fault."""

from __future__ import annotations

import random

from services.lab.chaos import Fault, Outcome, refused_after
from services.lab.common import BACKOFF_MAX_S, RETRY_JITTER, retry_delay


def test_a_retry_waits_the_retry_after_plus_jitter_and_backs_off_without_one():
    rng = random.Random(1)
    waits = [retry_delay(2.0, 1, rng) for _ in range(200)]
    assert min(waits) >= 2.0 and max(waits) <= 2.0 * (1 + RETRY_JITTER)
    assert max(waits) - min(waits) > 0.5  # jittered: refused together, not back together
    first, third = retry_delay(None, 1, rng), retry_delay(None, 3, rng)
    assert 0.25 <= first <= 0.5 and 1.0 <= third <= 2.0
    assert BACKOFF_MAX_S / 2 <= retry_delay(None, 50, rng) <= BACKOFF_MAX_S


def outcome(priority: str, started: float, status: str, accepted_at: float = 0.0) -> Outcome:
    return Outcome(0, started, priority, accepted_at=accepted_at, status=status)


def test_each_priority_is_reported_refused_from_its_first_refusal_to_its_first_acceptance_after_each_fault():
    faults = [Fault("prefill", 100.0, "prefill-1"), Fault("nats", 200.0, "nats-server")]
    outcomes = [
        outcome("interactive", 90.0, "completed", accepted_at=90.1),
        outcome("interactive", 101.0, "refused"), outcome("interactive", 104.0, "refused"),
        outcome("interactive", 108.0, "completed", accepted_at=108.5),  # back 7.5 s after the first refusal
        outcome("batch", 102.0, "refused"),  # never accepted again before the end
        outcome("batch", 150.0, "refused"),
        outcome("interactive", 201.0, "completed", accepted_at=201.2),
    ]
    lines = refused_after(outcomes, faults, end=260.0)
    assert len(lines) == 2
    assert "prefill" in lines[0] and "interactive 7.5 s (2 refusals)" in lines[0]
    assert "batch until the end (2 refusals)" in lines[0]
    assert "interactive not refused" in lines[1] and "batch not refused" in lines[1]


def test_frames_that_carry_several_tokens_are_not_missing_tokens():
    from services.lab.common import token_faults
    # speculation: 10 tokens in 4 frames
    assert token_faults([(0, 1), (1, 4), (2, 3), (3, 2)], True, 10) == (0, 0)
    # frame 2 lost: its 3 tokens are missing; frame 1 seen twice: its 4 tokens duplicated
    assert token_faults([(0, 1), (1, 4), (1, 4), (3, 2)], True, 10) == (4, 3)
    # unfinished: frames missing below the last one seen
    assert token_faults([(0, 1), (2, 1)], False, 0) == (0, 1)
