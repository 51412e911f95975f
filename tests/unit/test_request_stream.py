import asyncio

import pytest

from bus.messages import ErrorEvent, TokenEvent
from bus.ordering import RequestStream


def tok(seq):
    return TokenEvent(request_id="r", seq=seq, text=str(seq), token_ids=[seq])


async def test_events_come_out_in_order_exactly_once():
    stream = RequestStream("r", gap_timeout_s=1)
    for seq in (1, 0, 0, 2, 1, 3):
        stream.deliver(tok(seq))
    assert [(await stream.next(1)).seq for _ in range(4)] == [0, 1, 2, 3]
    assert stream.duplicates == 2


async def test_a_gap_that_does_not_fill_becomes_a_stream_gap_error():
    stream = RequestStream("r", gap_timeout_s=0.05)
    stream.deliver(tok(0))
    stream.deliver(tok(2))
    assert (await stream.next(1)).seq == 0
    gap = await stream.next(1)
    assert isinstance(gap, ErrorEvent) and gap.code == "stream_gap" and gap.seq == 1


async def test_silence_without_a_gap_is_a_timeout():
    stream = RequestStream("r", gap_timeout_s=0.01)
    with pytest.raises(asyncio.TimeoutError):
        await stream.next(0.05)


async def test_a_gap_is_filled_from_the_capture_before_it_counts_as_lost():
    looked_up: list[int] = []

    async def capture(request_id: str, first_seq: int):
        looked_up.append(first_seq)
        return [tok(seq) for seq in range(first_seq, 4)]  # the capture has everything

    stream = RequestStream("r", gap_timeout_s=5, refill=capture, refill_after_s=0.01)
    for seq in (0, 3):
        stream.deliver(tok(seq))
    assert [(await stream.next(1)).seq for _ in range(4)] == [0, 1, 2, 3]
    assert looked_up == [1] and stream.refilled == 2


async def test_a_gap_the_capture_cannot_fill_either_is_a_retryable_stream_gap():
    async def capture(request_id: str, first_seq: int):
        return []

    stream = RequestStream("r", gap_timeout_s=0.05, refill=capture, refill_after_s=0.01)
    stream.deliver(tok(0))
    stream.deliver(tok(2))
    assert (await stream.next(1)).seq == 0
    gap = await stream.next(1)
    assert isinstance(gap, ErrorEvent) and gap.code == "stream_gap" and gap.retryable


async def test_no_capture_lookup_without_a_gap():
    async def capture(request_id: str, first_seq: int):
        raise AssertionError("the normal path must not read the capture")

    stream = RequestStream("r", gap_timeout_s=1, refill=capture, refill_after_s=0.01)
    for seq in (0, 1, 2):
        stream.deliver(tok(seq))
    assert [(await stream.next(1)).seq for _ in range(3)] == [0, 1, 2]
    with pytest.raises(asyncio.TimeoutError):
        await stream.next(0.05)


async def test_a_gap_that_opens_while_waiting_is_noticed():
    found = []

    async def capture(request_id: str, first_seq: int):
        found.append(first_seq)
        return [tok(1)]

    stream = RequestStream("r", gap_timeout_s=5, refill=capture, refill_after_s=0.01)
    stream.deliver(tok(0))
    assert (await stream.next(1)).seq == 0
    waiting = asyncio.create_task(stream.next(2))  # waits with nothing early
    await asyncio.sleep(0.01)
    stream.deliver(tok(2))  # event 1 was lost on the way
    assert (await waiting).seq == 1 and found == [1]
