"""The edge's tokenizer (edge/tokenizer.py) when its model's files cannot be reached: a clear
error, and no second load until RETRY_AFTER_S has passed (a client cannot make each call a load)."""

from __future__ import annotations

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
