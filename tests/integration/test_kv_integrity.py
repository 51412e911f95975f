"""The real KV connector inside the real vLLM engine, with the suite's Redis-compatible server:
a block corrupted in Redis is recomputed, never used, and one tenant never loads another's KV.

One engine with the prefill pool's connector role (kv_both: it saves every full prompt block
and loads what Redis holds, the same load path a decode engine takes), driven in this process
through the engine interface the workers use, so each step's KV report and transfer record can
be read directly. prefix caching inside the engine is off (inference/profiles.py): every
reuse goes through the connector and Redis.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import redis

from bus.messages import ChatMessage, SamplingSpec
from inference.pools import pool_named
from kv_store.block_store import TAG_BYTES
from kv_store.config import KvConfig
from kv_store.keys import kv_request, transfer_stats_key
from kv_store.records import KvReport, TransferRecord, record_from_hash
from services.settings import Settings
from tests.integration.conftest import MAX_TOKENS, in_process

pytestmark = pytest.mark.engine


@dataclasses.dataclass
class Run:
    request_id: str
    text: str
    cached_tokens: int
    report: KvReport
    record: TransferRecord


@pytest.fixture(scope="module")
def kv_settings(engine_settings: Settings) -> Settings:
    """The session's settings with KV keys of this module's own, under the stack's default prefix
    (what the embedded server's user may touch)."""
    return in_process(engine_settings).replace(kv_key_prefix=f"{KvConfig().kv_key_prefix}:{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
async def engine(kv_settings: Settings):
    from inference.vllm_engine import VllmEngine
    from services.processes import engine_setup

    # The secret file's path, as the worker hands it to the connector (processes.engine_setup).
    setup = dataclasses.replace(engine_setup(kv_settings), secret_file=kv_settings.bus.secret_file)
    eng = VllmEngine(setup, pool_named("prefill"))
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
def raw(kv_settings: Settings):
    with redis.Redis.from_url(kv_settings.kv.redis_url) as client:
        yield client


def prompt_of(engine, words: str) -> list[int]:
    system = f"[{uuid.uuid4().hex}] You are a careful assistant who answers in plain words. " * 6
    return engine.render_chat([ChatMessage("system", system), ChatMessage("user", words)])


async def run(engine, raw, settings: Settings, prompt: list[int], tenant: str | None, handle=None) -> Run:
    rid = uuid.uuid4().hex
    text, cached, report = "", 0, None
    async for chunk in engine.generate(rid, prompt, SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0),
                                       MAX_TOKENS, kv=kv_request(rid, tenant, handle)):
        text += chunk.text
        cached = chunk.cached_tokens
        report = chunk.kv or report
    assert report is not None
    record = record_from_hash(raw.hgetall(transfer_stats_key(settings.kv.kv_key_prefix, rid)))
    return Run(rid, text, cached, report, record)


def corrupt(raw, keys) -> None:
    """Every payload byte inverted, the tag left as it was: only a reader that checks notices."""
    for key in keys:
        blob = raw.getex(key)
        assert blob is not None, key
        raw.set(key, blob[:TAG_BYTES] + bytes(b ^ 0xFF for b in blob[TAG_BYTES:]), ex=600)


async def test_corrupted_blocks_are_recomputed_never_used(engine, raw, kv_settings):
    prompt = prompt_of(engine, "Name a large ocean and say one thing about it.")
    cold = await run(engine, raw, kv_settings, prompt, "acme")
    blocks = (len(prompt) - 1) // 32  # the loadable full blocks (one prompt token is always computed)
    assert cold.report.loaded_tokens == 0 and cold.report.handle is not None and blocks >= 3
    warm = await run(engine, raw, kv_settings, prompt, "acme")
    assert warm.text == cold.text  # the connector's loads give the same greedy answer
    # and the first tokens of the last block, saved at its last multiple of kv_partial_step (16),
    # when that leaves a prompt token to compute
    tail, step = len(prompt) % 32, kv_settings.kv.kv_partial_step
    partial = tail // step * step if tail % step else 0
    assert warm.report.loaded_tokens == blocks * 32 + partial, (len(prompt), warm.report)
    assert warm.record.load.blocks == blocks + (partial > 0)

    # The prefix-reuse path: the prompt's blocks are looked up by their keys.
    corrupt(raw, cold.report.handle.keys)
    again = await run(engine, raw, kv_settings, prompt, "acme")
    assert again.text == cold.text
    assert again.record.load.blocks == 0 and again.record.load.failed == blocks, again.record
    assert again.record.load.bytes == 0

    # The decode path: the request names the prompt's blocks by handle. (The run above saved
    # good blocks again, as any producer that computes the prompt does.)
    corrupt(raw, cold.report.handle.keys)
    decoded = await run(engine, raw, kv_settings, prompt, "acme", handle=cold.report.handle)
    assert decoded.text == cold.text
    assert decoded.record.load.blocks == 0 and decoded.record.load.failed == blocks, decoded.record


async def test_a_tenant_never_loads_another_tenants_kv(engine, raw, kv_settings):
    prompt = prompt_of(engine, "Describe a cat in one sentence.")
    gold = await run(engine, raw, kv_settings, prompt, "gold")
    gold_again = await run(engine, raw, kv_settings, prompt, "gold")
    assert gold_again.report.loaded_tokens > 0  # the same tenant is served from its KV

    bulk = await run(engine, raw, kv_settings, prompt, "bulk")  # same tokens, other tenant
    assert bulk.report.loaded_tokens == 0 and bulk.cached_tokens == 0 and bulk.record.load.blocks == 0
    assert bulk.text == gold.text

    # A decode request of tenant bulk whose handle names gold's blocks (a bug, or a forged job):
    # the handle is checked against bulk's own keys, so nothing of gold's is loaded.
    forged = await run(engine, raw, kv_settings, prompt, "bulk", handle=gold.report.handle)
    assert forged.report.loaded_tokens == 0 and forged.cached_tokens == 0 and forged.record.load.blocks == 0
    assert forged.report.load_reason == "handle keys do not match the request's tokens"
    assert forged.text == gold.text
