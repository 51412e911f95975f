"""The edge's tokenizer (edge/tokenizer.py) when its model's files cannot be reached: a clear
error, and no second load until RETRY_AFTER_S has passed (a client cannot make each call a load)."""

from __future__ import annotations

import asyncio

import pytest

from edge import tokenizer as module
from edge.tokenizer import Tokenizer, TokenizerUnavailable


async def test_a_failed_load_is_not_tried_again_before_its_retry_time(tmp_path, monkeypatch):
    edge = Tokenizer(str(tmp_path / "no-model-here"))
    loads = 0
    real_load = edge._load

    def counted() -> object:
        nonlocal loads
        loads += 1
        return real_load()

    monkeypatch.setattr(edge, "_load", counted)
    for _ in range(3):
        with pytest.raises(TokenizerUnavailable, match="no-model-here"):
            await edge.tokenize("hello")
    assert loads == 1
    monkeypatch.setattr(module, "RETRY_AFTER_S", 0.0)
    with pytest.raises(TokenizerUnavailable):
        await edge.tokenize("hello")
    assert loads == 2


async def test_callers_that_give_up_do_not_start_more_loads(tmp_path, monkeypatch):
    """A load that takes long (a slow disk or hub) is one load, however many callers leave."""
    import threading

    edge = Tokenizer(str(tmp_path / "slow"))
    loads, release = 0, threading.Event()

    def slow() -> object:
        nonlocal loads
        loads += 1
        release.wait(10)
        return "the tokenizer"

    monkeypatch.setattr(edge, "_load", slow)
    for _ in range(3):  # each caller's client leaves before the load ends
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(edge._tokenizer(), 0.05)
    release.set()
    assert await edge._tokenizer() == "the tokenizer" and loads == 1
