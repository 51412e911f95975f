"""A simulated engine with vLLM's timing, for queueing behaviour at fleet scale on a small machine.

Same interface and text contract as FakeEngine (tokens are UTF-8 bytes; the answer is a fixed
function of the conversation, so a decode that continues from prompt + first token + the tokens
already sent produces exactly the rest; the KV contract with a BlockStore), but every token
comes out of a continuous-batching step loop (services/lab/sim_batcher.py) whose step times are
calibrated on the real engine (services/lab/sim_calibration.py). Answers never end early: after
the echo they go on through a fixed text, so every request runs to its max_tokens, as a real
model's long answers do.

Tokens are bytes, but a prompt's compute is charged in the model's tokens: its bytes times
`Calibration.tokens_per_prompt_byte` (a short chat prompt is about 0.7 SmolLM2 tokens per byte).
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import math
from typing import AsyncIterator

from bus.messages import SamplingSpec
from inference.engine import EngineChunk
from services.lab.fake_engine import ASSISTANT, FakeEngine, reply_for
from services.lab.sim_batcher import Batcher, Clock
from services.lab.sim_calibration import Calibration
from kv_store.block_store import BlockStore
from kv_store.records import KvRequest

FILLER = (b" Queues form when work arrives faster than it is served; a steady stream hides it, a "
          b"burst shows it. Admission control keeps the urgent fast and asks the rest to come back"
          b" later.")


def answer(conversation: bytes, length: int) -> bytes:
    """The first `length` bytes of the endless answer to `conversation`."""
    head = reply_for(conversation)
    if length <= len(head):
        return head[:length]
    repeats = (length - len(head)) // len(FILLER) + 1
    return (head + b"".join(itertools.repeat(FILLER, repeats)))[:length]


class SimEngine(FakeEngine):
    def __init__(self, role: str = "direct", calibration: Calibration | None = None,
                 max_num_seqs: int = 16, store: BlockStore | None = None, key_prefix: str = "gskv",
                 model_id: str = "sim", max_model_len: int = 2048, clock: Clock | None = None) -> None:
        cal = calibration or Calibration.load(None)
        super().__init__(role=role, store=store, key_prefix=key_prefix, model_id=model_id,
                         max_model_len=max_model_len)
        self.kv_capacity_tokens = cal.kv_capacity_tokens
        self.calibration = cal
        self.batcher = Batcher(cal, max_num_seqs, cal.kv_capacity_tokens, clock)

    async def shutdown(self) -> None:
        await self.batcher.stop()

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                       max_tokens: int, kv: KvRequest | None = None) -> AsyncIterator[EngineChunk]:
        self.started += 1
        head, _, already = bytes(prompt_token_ids).rpartition(ASSISTANT)
        reply = answer(head + ASSISTANT, len(already) + max_tokens)[len(already):]
        loaded, report = self._kv(prompt_token_ids, kv)
        n = len(prompt_token_ids)
        compute = math.ceil((n - loaded) * self.calibration.tokens_per_prompt_byte)
        seq = self.batcher.submit(compute, len(reply), n + max_tokens)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            for byte in reply:
                await seq.next_token()
                yield EngineChunk([byte], decoder.decode(bytes([byte])), prompt_tokens=n, cached_tokens=loaded)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted += 1
            raise
        finally:
            self.batcher.remove(seq)
        yield EngineChunk([], decoder.decode(b"", final=True), "length", n, loaded, report)
