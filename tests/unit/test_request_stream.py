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
